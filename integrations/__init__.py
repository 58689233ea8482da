"""Roles that push the event stream to the outside world (webhooks). Like every role they meet
the others only on NATS: they may import ``mlynar_events`` and nothing else of ours."""
