"""The box's hardware behind one small interface; drivers are chosen once, at start-up."""
