-- Schema version 5: the node executing a run (SPEC.md section 6), null when none.
ALTER TABLE runs ADD COLUMN node TEXT;
