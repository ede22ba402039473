-- Schema version 7: a chunk's text and thinking deltas may be stored compact (see chunk.rs): a line `t"..."`
-- or `h<step> "..."` is a delta whose envelope (run, agent, subagent flag) is the previous line's. No table
-- changes; the version marks the format, so a binary that cannot read such lines refuses the database instead
-- of reporting its rows corrupt.
SELECT 1;
