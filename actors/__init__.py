"""The actors of hydrod, one module each."""
