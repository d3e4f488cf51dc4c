"""One router per resource: openai (forwarded), classify, adapters (admin), ops (health)."""
