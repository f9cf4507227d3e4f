"""The agents' console at ``/console``: open escalations, conversations, replies through the
outbox, private notes, and the hand-back to the assistant (see ``app.py``)."""
