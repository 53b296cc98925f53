"""hydrod: the MQTT backbone of a hydroponics greenhouse."""
