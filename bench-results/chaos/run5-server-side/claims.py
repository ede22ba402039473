"""Server-side takeover times of a chaos run whose node logs were kept: for each run another node took over,
the node's "taking over a run of a lost node" log line (its claim) against the kill, beside the clients' first
receipt of its run_resumed. Usage: python3 claims.py SOAK_JSON LOG_DIR (the logs agentd-n<node>-<restart>.log
of the soak's work folder; the first line of each restart's log dates the restart, which dates the load's start)."""
import datetime, glob, json, re, statistics, sys

soak, logs = sys.argv[1], sys.argv[2]
d = json.load(open(soak))
ansi = re.compile(r'\x1b\[[0-9;]*m')


def ts(line):
    m = re.match(r'(\S+Z)', ansi.sub('', line))
    return datetime.datetime.fromisoformat(m.group(1).replace('Z', '+00:00')).timestamp() if m else None


starts = []
for k, r in enumerate(d['restarts'], 1):
    try:
        first = open(f"{logs}/agentd-n{r['node'] + 1}-{k}.log").readline()
    except OSError:
        continue
    if ts(first):
        starts.append(ts(first) - r['at_s'] - r['pause_ms'] / 1000)
t0 = statistics.median(starts)
claims = {}
for f in glob.glob(f'{logs}/agentd-*.log'):
    for line in open(f):
        if 'taking over a run' in line:
            claims[re.search(r'run_id=(\w+)', ansi.sub('', line)).group(1)] = ts(line) - t0
rows = [(x['takeover_s'], claims[x['run']] - x['kill_s'])
        for x in d['takeovers']['takeovers'] if x['run'] in claims]
q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]
srv, cli = [r[1] for r in rows], [r[0] for r in rows]
print(f"load start dated from {len(starts)} restarts (spread {max(starts) - min(starts):.2f} s)")
print(f"{len(rows)} runs taken over by another node (of {len(d['takeovers']['takeovers'])} resumes)")
print(f"kill -> claim by the other node:        p50 {q(srv, .5):.2f} s, p99 {q(srv, .99):.2f} s, max {max(srv):.2f} s")
print(f"kill -> first client receipt (same runs): p50 {q(cli, .5):.2f} s, p99 {q(cli, .99):.2f} s, max {max(cli):.2f} s")
