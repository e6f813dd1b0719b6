"""Contract shared by training/export (`model_export`) and serving (`service`).

numpy only: no torch, no FastAPI. Both sides import these modules so that the event
record format, the id bucketing, the user-state layout and the manifest schema exist
exactly once.
"""
