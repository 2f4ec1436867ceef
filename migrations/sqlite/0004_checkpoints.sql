-- Named positions in the log for consumers that are not projections (the embedded
-- mode's agent tails the log from here). Projections keep their own checkpoints next
-- to their tables (0002).
CREATE TABLE IF NOT EXISTS colloquy_checkpoints (
    name     TEXT PRIMARY KEY,
    position INTEGER NOT NULL DEFAULT 0
);
