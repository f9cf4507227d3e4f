-- 0009: an own-number message (an Evolution echo that matches no send) is a person typing on
-- the business phone unless the pipeline queued that text for that number in the last day
-- (pipeline/store/receipts.py, the `phone` rule). That check read the whole outbox for every
-- such echo; this index makes it a look-up by recipient and time (issue 16: it was the
-- live path's most expensive statement).
CREATE INDEX outbox_target ON outbox (instance, target, created_at);
