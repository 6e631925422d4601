"""The Auto Doctor session listener."""
