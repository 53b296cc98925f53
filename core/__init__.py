"""hydrod's behaviour as plain classes, driven synchronously by tests and by the thin
pykka shells in `actors/` (Mopidy's pattern: an API class, an actor that feeds it)."""
