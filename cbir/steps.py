"""The steps of the localization pipeline, in the order they run (``cbir pipeline --from``)."""

STEPS = ("extract", "retrieve", "match", "map", "localize", "evaluate")
