"""The phone side of powerbox (DESIGN §5): the wallet, the Bluetooth central, the visit at a
box, the settlement server's client, sync, and the `powerbox phone` CLI (docs/phone.md)."""
