"""Scripted BLE peers for tests and benchmarks: a bless echo box and a remote-controlled bleak phone.

Both run as child processes on a test-bench node (unmodified bless and bleak over the org.bluez
emulator) and talk JSON lines on stdin/stdout; :mod:`testbench.ble_demo.control` drives them.
"""
