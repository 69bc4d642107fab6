"""The restore path: targets, reads (pure), the engine that fetches, verifies and places, shared reads."""
