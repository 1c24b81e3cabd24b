"""The ways in: each edge turns its protocol into calls on the core, and never
calls another edge."""
