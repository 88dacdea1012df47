"""A conversation store: users, conversations and messages as JSON over HTTP."""
