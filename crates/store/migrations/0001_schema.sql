-- Cell Monitor schema, version 1.
--
-- Keys of the event-derived rows (students, teams, sessions, notebooks,
-- cells) are UUIDv5 values the persister derives from natural keys
-- (see cellmon_store::ids), so a batch can insert parents and children
-- without reading ids back, and a replay lands on the same rows.

CREATE TABLE classes (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    -- SHA-256 of the class's ingest token; the token itself is never stored.
    ingest_token_sha256 bytea UNIQUE,
    consecutive_error_threshold smallint NOT NULL DEFAULT 3
        CHECK (consecutive_error_threshold BETWEEN 1 AND 255),
    idle_after_seconds integer NOT NULL DEFAULT 300 CHECK (idle_after_seconds > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE instructors (
    id uuid PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Who teaches which class: the gateway authorizes subscriptions with it.
CREATE TABLE class_instructors (
    class_id uuid NOT NULL REFERENCES classes (id) ON DELETE CASCADE,
    instructor_id uuid NOT NULL REFERENCES instructors (id) ON DELETE CASCADE,
    PRIMARY KEY (class_id, instructor_id)
);
CREATE INDEX class_instructors_by_instructor ON class_instructors (instructor_id);

CREATE TABLE teams (
    id uuid PRIMARY KEY,
    class_id uuid NOT NULL REFERENCES classes (id) ON DELETE CASCADE,
    name text NOT NULL,
    UNIQUE (class_id, name)
);

-- A student of one class, identified in it by e-mail (or an LMS user id,
-- written `user:<id>`). Name and team follow the newest event that named
-- them (profile_time), whatever order events arrive in.
CREATE TABLE students (
    id uuid PRIMARY KEY,
    class_id uuid NOT NULL REFERENCES classes (id) ON DELETE CASCADE,
    student_key text NOT NULL,
    email text,
    name text,
    team_id uuid REFERENCES teams (id) ON DELETE SET NULL,
    profile_time timestamptz,
    first_seen timestamptz,
    last_seen timestamptz,
    -- Counted only for newly inserted executions, in the same transaction,
    -- so replays never inflate them.
    executions bigint NOT NULL DEFAULT 0,
    failed_executions bigint NOT NULL DEFAULT 0,
    UNIQUE (class_id, student_key)
);

-- Students put on a class's roster by a course admin (students also appear
-- by themselves with their first event).
CREATE TABLE enrollments (
    student_id uuid PRIMARY KEY REFERENCES students (id) ON DELETE CASCADE,
    enrolled_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sessions (
    id uuid PRIMARY KEY,
    student_id uuid NOT NULL REFERENCES students (id) ON DELETE CASCADE,
    client_session text NOT NULL,
    first_seen timestamptz NOT NULL,
    last_seen timestamptz NOT NULL
);
CREATE INDEX sessions_by_student ON sessions (student_id);

-- Per student: the same path for two students is two notebooks.
CREATE TABLE notebooks (
    id uuid PRIMARY KEY,
    student_id uuid NOT NULL REFERENCES students (id) ON DELETE CASCADE,
    path text NOT NULL,
    UNIQUE (student_id, path)
);

-- A cell of a student's notebook; notebook_id is null when the event had
-- no notebook path.
CREATE TABLE cells (
    id uuid PRIMARY KEY,
    student_id uuid NOT NULL REFERENCES students (id) ON DELETE CASCADE,
    notebook_id uuid REFERENCES notebooks (id) ON DELETE CASCADE,
    client_cell_id text NOT NULL,
    cell_type text
);
CREATE INDEX cells_by_student ON cells (student_id);

-- Every event, once (event_id is the idempotency key end to end).
-- event_time orders the status rules: the client's clock, else receive time.
CREATE TABLE events (
    event_id uuid PRIMARY KEY,
    class_id uuid NOT NULL REFERENCES classes (id) ON DELETE CASCADE,
    student_id uuid NOT NULL REFERENCES students (id) ON DELETE CASCADE,
    event_type text NOT NULL,
    event_time timestamptz NOT NULL,
    client_time timestamptz,
    received_at timestamptz NOT NULL,
    session_id uuid REFERENCES sessions (id) ON DELETE SET NULL,
    notebook_id uuid REFERENCES notebooks (id) ON DELETE SET NULL,
    cell_id uuid REFERENCES cells (id) ON DELETE SET NULL,
    -- The validated event; for executions without code, result and error
    -- text, which live in cell_executions.
    payload jsonb NOT NULL,
    persisted_at timestamptz NOT NULL DEFAULT now()
);
-- A student's newest events (last activity, history pages).
CREATE INDEX events_by_student_time ON events (student_id, event_time DESC, event_id DESC);
CREATE INDEX events_by_class_time ON events (class_id, event_time DESC);

CREATE TABLE cell_executions (
    event_id uuid PRIMARY KEY REFERENCES events (event_id) ON DELETE CASCADE,
    student_id uuid NOT NULL REFERENCES students (id) ON DELETE CASCADE,
    cell_id uuid NOT NULL REFERENCES cells (id) ON DELETE CASCADE,
    event_time timestamptz NOT NULL,
    code text,
    result text,
    error_message text,
    has_error boolean NOT NULL,
    duration_ms double precision,
    execution_count integer,
    cell_index integer
);
-- Latest executions per student.
CREATE INDEX cell_executions_by_student_time
    ON cell_executions (student_id, event_time DESC, event_id DESC);
-- Trailing runs (and errors) per cell, newest first.
CREATE INDEX cell_executions_by_cell_time
    ON cell_executions (cell_id, event_time DESC, event_id DESC) INCLUDE (has_error);

CREATE TABLE help_events (
    event_id uuid PRIMARY KEY REFERENCES events (event_id) ON DELETE CASCADE,
    student_id uuid NOT NULL REFERENCES students (id) ON DELETE CASCADE,
    notebook_path text,
    event_time timestamptz NOT NULL,
    kind text NOT NULL CHECK (kind IN ('help', 'help_stop'))
);
CREATE INDEX help_events_by_student_time ON help_events (student_id, event_time DESC);

-- An instructor's dismissal of a help request: it names the newest `help`
-- they saw (through_*), so it sticks through that request's heartbeats.
CREATE TABLE help_dismissals (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    student_id uuid NOT NULL REFERENCES students (id) ON DELETE CASCADE,
    notebook_path text,
    through_time timestamptz NOT NULL,
    through_event_id uuid NOT NULL,
    instructor_id uuid REFERENCES instructors (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX help_dismissals_by_student ON help_dismissals (student_id);

-- An instructor's resolution of a cell's errors up to the run it names.
CREATE TABLE error_resolutions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    student_id uuid NOT NULL REFERENCES students (id) ON DELETE CASCADE,
    cell_id uuid NOT NULL REFERENCES cells (id) ON DELETE CASCADE,
    through_time timestamptz NOT NULL,
    through_event_id uuid NOT NULL,
    instructor_id uuid REFERENCES instructors (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX error_resolutions_by_student ON error_resolutions (student_id);

CREATE TABLE assignments (
    id uuid PRIMARY KEY,
    class_id uuid NOT NULL REFERENCES classes (id) ON DELETE CASCADE,
    title text NOT NULL,
    notebook_path text,
    due_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE submissions (
    id uuid PRIMARY KEY,
    assignment_id uuid NOT NULL REFERENCES assignments (id) ON DELETE CASCADE,
    student_id uuid NOT NULL REFERENCES students (id) ON DELETE CASCADE,
    submitted_at timestamptz NOT NULL,
    grade real,
    UNIQUE (assignment_id, student_id)
);

-- The derived status of each student, as last computed after a commit:
-- the dashboard's snapshot, and the "before" that alerts are computed from.
CREATE TABLE student_status (
    student_id uuid PRIMARY KEY REFERENCES students (id) ON DELETE CASCADE,
    class_id uuid NOT NULL REFERENCES classes (id) ON DELETE CASCADE,
    status text NOT NULL,
    detail jsonb NOT NULL,
    computed_at timestamptz NOT NULL
);
CREATE INDEX student_status_by_class ON student_status (class_id);
