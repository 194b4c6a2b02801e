-- Cell Monitor schema, version 2: help conversations.
--
-- A conversation ("thread") is one instructor and one student of a class the
-- instructor teaches. Who may write to a thread is checked when a message is
-- sent (cellmon_store::messages::send); messages stay when an instructor
-- stops teaching the class, and the instructor's views then leave them out.

-- One message of a thread. `id` orders messages (it increases with time) and
-- is the paging cursor, so pages never skip or repeat a message sent in the
-- same instant as another.
CREATE TABLE direct_messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    class_id uuid NOT NULL REFERENCES classes (id) ON DELETE CASCADE,
    instructor_id uuid NOT NULL REFERENCES instructors (id) ON DELETE CASCADE,
    -- Student ids are per class (derived from class and student key).
    student_id uuid NOT NULL REFERENCES students (id) ON DELETE CASCADE,
    -- The side that wrote it; the other side is the recipient.
    sender text NOT NULL CHECK (sender IN ('instructor', 'student')),
    -- Checked (trimmed, no NUL, at most 4000 characters) before it gets here.
    body text NOT NULL CHECK (length(body) BETWEEN 1 AND 4000),
    sent_at timestamptz NOT NULL DEFAULT now(),
    -- When the recipient read it; null while unread.
    read_at timestamptz
);

-- A thread's messages, newest first (history pages).
CREATE INDEX direct_messages_by_thread
    ON direct_messages (student_id, instructor_id, id DESC);
-- A student's messages across instructors, newest first (the student's
-- history pages).
CREATE INDEX direct_messages_by_student ON direct_messages (student_id, id DESC);
-- Unread messages per recipient: only unread rows are indexed, so the
-- indexes stay as small as what is waiting to be read.
CREATE INDEX direct_messages_unread_by_instructor
    ON direct_messages (instructor_id, id) WHERE read_at IS NULL AND sender = 'student';
CREATE INDEX direct_messages_unread_by_student
    ON direct_messages (student_id, id) WHERE read_at IS NULL AND sender = 'instructor';
