-- Times become fixed-width UTC text, `2026-02-01T10:00:00.500000Z`, whose
-- text order is their time order (see src/store/stamp.rs): until now they
-- were RFC 3339 with as many fraction digits as needed, and an offset as
-- given, which sort wrongly within a second. SQLite's strftime keeps
-- milliseconds, so older times lose any digit beyond (they were written
-- by a clock that rarely had them). Text that is not a time (hand-written)
-- is left as it is.

UPDATE releases SET
    created_at = CASE WHEN created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', created_at) || '000Z', created_at) ELSE created_at END,
    expires_at = CASE WHEN expires_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', expires_at) || '000Z', expires_at) ELSE expires_at END;
UPDATE rollouts SET
    created_at = CASE WHEN created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', created_at) || '000Z', created_at) ELSE created_at END;
UPDATE devices SET
    enrolled_at = CASE WHEN enrolled_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', enrolled_at) || '000Z', enrolled_at) ELSE enrolled_at END,
    last_seen = CASE WHEN last_seen GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', last_seen) || '000Z', last_seen) ELSE last_seen END;
UPDATE rollout_devices SET
    offered_at = CASE WHEN offered_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', offered_at) || '000Z', offered_at) ELSE offered_at END;
UPDATE device_events SET
    at = CASE WHEN at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', at) || '000Z', at) ELSE at END;
UPDATE api_tokens SET
    created_at = CASE WHEN created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', created_at) || '000Z', created_at) ELSE created_at END,
    expires_at = CASE WHEN expires_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', expires_at) || '000Z', expires_at) ELSE expires_at END,
    revoked_at = CASE WHEN revoked_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', revoked_at) || '000Z', revoked_at) ELSE revoked_at END;
-- The audit log refuses changes: its guard steps aside for this one.
DROP TRIGGER audit_log_append_only_update;
UPDATE audit_log SET
    at = CASE WHEN at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', at) || '000Z', at) ELSE at END;
CREATE TRIGGER audit_log_append_only_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
UPDATE webhooks SET
    created_at = CASE WHEN created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', created_at) || '000Z', created_at) ELSE created_at END,
    removed_at = CASE WHEN removed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', removed_at) || '000Z', removed_at) ELSE removed_at END;
UPDATE webhook_deliveries SET
    created_at = CASE WHEN created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', created_at) || '000Z', created_at) ELSE created_at END,
    delivered_at = CASE WHEN delivered_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN COALESCE(strftime('%Y-%m-%dT%H:%M:%f', delivered_at) || '000Z', delivered_at) ELSE delivered_at END;
