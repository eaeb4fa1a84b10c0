"""Completion webhooks: where they may go and how one is signed and sent; the queue delivers them."""
