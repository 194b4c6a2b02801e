-- Cell Monitor schema, version 3: the control plane.
--
-- Accounts, browser sessions, API tokens, invitations, rotating ingest
-- tokens and the audit log. Every secret (password, session, API token,
-- invitation, ingest token) is stored as a hash only: argon2id for
-- passwords, SHA-256 for the random tokens (they carry 256 bits of
-- randomness, so a fast hash is enough and a lookup by hash is one index
-- probe).

-- Admins and instructors are both rows of `instructors`: 1:1 messages and
-- class assignments already point at it, and an admin may teach too.
ALTER TABLE instructors
    ADD COLUMN role text NOT NULL DEFAULT 'instructor'
        CHECK (role IN ('admin', 'instructor')),
    -- argon2id PHC string; null until the account's invitation is used.
    ADD COLUMN password_hash text,
    ADD COLUMN password_changed_at timestamptz,
    ADD COLUMN disabled_at timestamptz;

-- A one-time link with which an invited instructor sets a password.
CREATE TABLE invites (
    token_sha256 bytea PRIMARY KEY,
    instructor_id uuid NOT NULL REFERENCES instructors (id) ON DELETE CASCADE,
    created_by uuid REFERENCES instructors (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at timestamptz
);
CREATE INDEX invites_by_instructor ON invites (instructor_id);

-- A browser login. `sessions` is taken by students' notebook sessions.
CREATE TABLE web_sessions (
    token_sha256 bytea PRIMARY KEY,
    instructor_id uuid NOT NULL REFERENCES instructors (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Idle expiry counts from here.
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    -- Absolute expiry, however active the session.
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX web_sessions_by_instructor ON web_sessions (instructor_id);

-- A named token for scripts, shown once when created.
CREATE TABLE api_tokens (
    id uuid PRIMARY KEY,
    instructor_id uuid NOT NULL REFERENCES instructors (id) ON DELETE CASCADE,
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    token_sha256 bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    expires_at timestamptz,
    revoked_at timestamptz
);
CREATE INDEX api_tokens_by_instructor ON api_tokens (instructor_id, created_at DESC);

-- A class's ingest tokens. A rotation adds the new token and gives the old
-- ones an `expires_at` (the grace period), so extensions running in a
-- lesson are not cut off; a token is valid while `expires_at` is null or in
-- the future.
CREATE TABLE class_ingest_tokens (
    token_sha256 bytea PRIMARY KEY,
    class_id uuid NOT NULL REFERENCES classes (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz
);
CREATE INDEX class_ingest_tokens_by_class ON class_ingest_tokens (class_id, created_at DESC);

INSERT INTO class_ingest_tokens (token_sha256, class_id)
SELECT ingest_token_sha256, id FROM classes WHERE ingest_token_sha256 IS NOT NULL;
ALTER TABLE classes DROP COLUMN ingest_token_sha256;

-- What admins (and instructors, for class actions) did. No foreign keys:
-- an entry outlives the account and the class it names. It holds ids and
-- action names, never a student's personal data.
CREATE TABLE audit_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor_id uuid,
    action text NOT NULL,
    class_id uuid,
    target text,
    detail jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_by_class ON audit_log (class_id, id DESC) WHERE class_id IS NOT NULL;
