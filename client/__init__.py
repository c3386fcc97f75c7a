"""The tokenwire client: light, never imports torch."""
