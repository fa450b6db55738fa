"""``docs/reliability.md`` from the figures of ``benchmarks/faults.py`` (it reads them; it computes nothing new
but the goal checks)."""

from __future__ import annotations

from typing import Any

FULL = "flock /tmp/snodevit-heavy.lock make bench-faults"
QUICK = "python benchmarks/faults.py --quick --out runs/faults-quick"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def goals(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(goal, target, measured, met) of issue 20."""
    drain, crash, soak = r["server"]["drain"], r["server"]["crash"], r["soak"]
    lost = drain["no_answer"] + sum(drain["other_statuses"].values())
    mem = soak["memory"]["worker"]["second_half_growth_pct"]
    p50, p99 = soak["p50_ms"] or 0.0, soak["p99_ms"] or 0.0
    broken = r["broken"]
    never_ready = all("200" not in b["readyz_polls"] and b["readyz"][0] == 503 for b in broken.values())
    score = r["score"]
    disk_ok = ("mount_unavailable" not in score and score["full"]["exit_code"] == 74
               and score["full"]["files_left"] == ["scores.jsonl.partial"] and score["resume"]["rows_equal_reference"]
               and score["read_only"]["exit_code"] == 74 and score["read_only"]["files_left"] == [])
    return [
        ("SIGTERM under load: admitted requests lost", "0", f"{lost} (of {drain['requests']} requests)", lost == 0),
        ("SIGTERM: exit code", "0", str(drain["exit_code"]), drain["exit_code"] == 0),
        ("soak: errors beyond the documented 429s", "0", str(soak["errors_beyond_429"]), soak["errors_beyond_429"] == 0),
        ("soak: worker RSS growth over the second half", "<= 2 %", f"{mem:+.2f} %", mem <= 2.0),
        ("soak: p99 of admitted requests", "<= 2 x p50", f"{p99:.0f} ms = {p99 / p50:.2f} x p50 ({p50:.0f} ms)"
         if p50 else "n/a", bool(p50) and p99 <= 2 * p50),
        ("kill -9: recovery measured, /readyz not 200 until warm", "measured",
         f"{crash['recovery_s']} s; /readyz before: {crash['readyz_answers_before_ready']}",
         crash["recovery_s"] is not None and crash["initializations_logged"] == 1),
        ("broken model at start: never ready, with a reason", "3 of 3", f"{sum(1 for _ in broken)} faults, never ready: "
         f"{_yes(never_ready)}", never_ready),
        ("score on a full disk / read-only folder", "clear error, nothing half-written, resume works",
         "exit 74, whole rows kept, resume equal to the reference" if disk_ok else str(score), disk_ok),
    ]


def _intro(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    mode = "quick run (30-second soak)" if r["quick"] else "full run"
    return [
        "# Reliability under load and faults",
        "",
        f"What the real server (`bentoml serve`, the shipped `{r['model']}` registered into a temporary BentoML home,"
        f" default settings, S = {r['num_samples']} per request) and the real `snodevit score` do when things go "
        f"wrong. Measured {m['date']} at commit `{m['commit']}` on {m['cpus']} CPU cores shared with other work "
        f"({mode}, {r['seconds']:.0f} s). Reproduce with `{FULL}` (`{QUICK}` for a short try); the figures are also"
        " in `reliability.json`. The code: `service/lifecycle.py` (states, drain, admission), `service/guard.py`"
        " (refusals), `service/store.py` (`check_served`), `snodevit/scoring/partial.py` and `errors.py` (write"
        " errors); the drivers: `benchmarks/faults*.py`.",
        "",
        *([f"**A quick run: the soak lasted {r['soak']['duration_s']:.0f} s, not the 10 minutes of `make bench-faults`; "
            "its figures say nothing yet about memory or latency over a long run.**", ""] if r["quick"] else []),
        "| goal | target | measured | met |",
        "|---|---|---|---|",
        *[f"| {g} | {t} | {m_} | {_yes(ok)} |" for g, t, m_, ok in goals(r)],
        "",
    ]


def _drain(r: dict[str, Any]) -> list[str]:
    d, dl = r["server"]["drain"], r["deadline"]
    return [
        "## SIGTERM under load (drain)",
        "",
        f"{r['clients']} closed-loop clients on `/classify` at S = {r['num_samples']}; after 3 s, SIGTERM to `bentoml "
        "serve` (what Kubernetes sends on a rolling update). A client stops at its first answer other than 200, as "
        "a load balancer would send its next request elsewhere.",
        "",
        f"- Requests in progress at the signal, answered 200 during the drain: "
        f"**{d['in_progress_at_sigterm_answered_200']}**; requests with no answer at all: **{d['no_answer']}**; other "
        f"statuses: {d['other_statuses'] or 'none'}.",
        f"- New requests refused with 503 `shutting_down` (the common error body, `Retry-After: 1`): "
        f"{d['refused_503_shutting_down']}.",
        f"- `/readyz`, polled every 20 ms from the signal: first non-200 answer after {d['readyz_first_not_ready_s']} s "
        f"(the arbiter forwards the signal to the worker); answers {d['readyz_answers_after_sigterm']}; 200 again "
        f"after the first 503: {d['readyz_200_after_first_503']}.",
        f"- `bentoml serve` exited with code **{d['exit_code']}**, {d['exit_s']} s after the signal.",
        "",
        "With `SNODEVIT_DRAIN_S=1` and requests of S = 256 (longer than the deadline): "
        f"{dl['in_progress_at_sigterm_answered_200']} answered 200, {dl['cut_at_drain_deadline']} answered 503 "
        f"`shutting_down` at the deadline (\"did not finish within SNODEVIT_DRAIN_S; retry it\"), "
        f"{dl['no_answer']} with no answer, exit code {dl['exit_code']} after {dl['exit_s']} s.",
        "",
    ]


def _crash(r: dict[str, Any]) -> list[str]:
    c = r["server"]["crash"]
    return [
        "## kill -9 of the worker under load",
        "",
        f"{r['clients']} clients at S = {r['num_samples']}; after 3 s, SIGKILL to the worker process (the arbiter "
        "survives). BentoML's arbiter (circus) starts a new worker, which loads and warms up the model before it "
        "accepts a connection; until then connections wait in the listening socket's backlog.",
        "",
        f"- Recovery: `/readyz` answered 200 again **{c['recovery_s']} s** after the kill (polled every 100 ms, 1 s "
        f"timeout); before that: {c['readyz_answers_before_ready']} (a timeout counts as not ready for a Kubernetes "
        "probe), never 200.",
        f"- Requests in progress on the killed worker: **{c['in_progress_at_kill_lost']} lost** (connection closed, no "
        "answer). They are not retried by the server: a client or a proxy retries them (`/classify` is idempotent "
        f"with a `seed`). Requests sent during the restart waited and were answered 200: "
        f"{c['sent_during_restart_answered_200']}; other answers: {c['other_answers'] or 'none'}.",
        f"- New worker warm: BentoML logged its initialisation {c['initializations_logged']} time(s); `/classify` "
        f"right after recovery: {c['classify_after_recovery']}.",
        "",
        "Inside a container built by `bentoml containerize` (`BENTOML_CONTAINERIZED` set) the arbiter does not "
        "respawn a dead worker; there the liveness probe (`/livez`) is what restarts the container.",
        "",
    ]


def _soak(r: dict[str, Any]) -> list[str]:
    s, a = r["soak"], r["server"]["admission"]
    mem = s["memory"]
    rows = [f"| {t['from_s']}-{t['to_s']} s | {t['admitted']} | {t['p50_ms']} | {t['p99_ms']} |" for t in s["tenths"]]
    samples = mem["samples"]
    step = max(1, len(samples) // 12)
    rss = [f"| {t:.0f} | {total:.0f} | {worker:.0f} |" for t, total, worker in samples[::step]]
    return [
        f"## Soak: {s['concurrency']} clients for {s['duration_s'] / 60:.1f} minutes",
        "",
        f"Closed loops at S = {s['num_samples']}; a client answered 429 waits the `Retry-After` it was given. The "
        f"admission limit ({a['max_in_flight']} requests) was sized at start from {a['measured_images_per_s']} "
        f"images/s (S = {a['num_samples']}) x `SNODEVIT_MAX_QUEUE_WAIT_S` = {a['max_queue_wait_s']} s, under the cap "
        f"`SNODEVIT_MAX_CONCURRENCY` = {a['max_concurrency']}.",
        "",
        f"- Statuses: {s['statuses']} ({s['requests']} requests); errors beyond the documented 429: "
        f"**{s['errors_beyond_429']}**; `Retry-After` values given: {s['retry_after_values']}.",
        f"- Admitted requests: {s['admitted_per_s']}/s, p50 **{s['p50_ms']} ms**, p99 **{s['p99_ms']} ms**. The "
        f"limit was sized for a {a['max_queue_wait_s']} s wait at the rate of the bare forward pass; served over "
        f"HTTP (decoding, answers, and the {s['concurrency']} clients themselves on the same cores) the rate was "
        f"{s['admitted_per_s'] / a['measured_images_per_s']:.0%} of it, so the wait was longer.",
        f"- Worker RSS: {mem['worker']['half_mib']} MiB at the half, {mem['worker']['end_mib']} MiB at the end "
        f"(**{mem['worker']['second_half_growth_pct']:+.2f} %** over the second half; peak {mem['worker']['peak_mib']} "
        f"MiB); all the server's processes: {mem['total']['half_mib']} -> {mem['total']['end_mib']} MiB "
        f"({mem['total']['second_half_growth_pct']:+.2f} %).",
        f"- Exit code after the closing SIGTERM: {s['exit_code_after_sigterm']}.",
        "",
        "| part of the soak | admitted | p50 ms | p99 ms |",
        "|---|---|---|---|",
        *rows,
        "",
        "| seconds | RSS of all processes (MiB) | worker RSS (MiB) |",
        "|---|---|---|",
        *rss,
        "",
    ]


def _broken(r: dict[str, Any]) -> list[str]:
    rows = []
    for fault, b in r["broken"].items():
        line = b["log_lines"][0] if b["log_lines"] else "(none)"
        rows.append(f"| {fault} | {b['alive_s']} | {b['readyz_polls']} | {b['classify'][0]} "
                    f"`{b['classify'][1].get('error')}` | {len(b['log_lines'])}: `{line[:160]}` | "
                    f"{b['tracebacks_logged']} | {b['exit_code']} |")
    return [
        "## A broken model at start",
        "",
        "A copy of the good store entry, damaged one way (`benchmarks/faults_models.py`), served by `bentoml serve`. "
        "The worker checks what it opened against the store entry (`service.store.check_served`: the weights' "
        "SHA-256 against the one recorded at registration and the one `meta.json` names; a calibration recorded at "
        "registration must still be there); opening refuses missing files and weights that do not parse. A broken "
        "model leaves the worker alive and never ready (exiting would only have BentoML's arbiter restart it into "
        "the same failure, in a loop): `/readyz`, `/metadata` and every API answer 503 `model_unavailable` with the "
        "reason, and one line is logged.",
        "",
        "| fault | alive after (s) | `/readyz` polled for 5 s | `/classify` | lines logged | tracebacks | exit code "
        "after SIGTERM |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _score(r: dict[str, Any]) -> list[str]:
    s = r["score"]
    if "mount_unavailable" in s:
        return ["## `snodevit score` on a full disk and a read-only folder", "",
                f"Not measured: this machine does not allow mounting a tmpfs ({s['mount_unavailable']}). "
                "`tests/test_score_disk.py` skips for the same reason.", ""]
    f, res, ro = s["full"], s["resume"], s["read_only"]
    return [
        "## `snodevit score` on a full disk and a read-only folder",
        "",
        f"{s['images']} MNIST test digits scored by `snodevit score` (a subprocess) onto a tmpfs the script mounts "
        f"and removes: {f['tmpfs_bytes']} bytes (a third of the reference output, {s['reference_bytes']} bytes), "
        "then 64 MiB (as after freeing space) and `--resume`; and a read-only tmpfs.",
        "",
        f"- Full disk: exit code **{f['exit_code']}**; stderr: `{f['message']}`; files left: {f['files_left']} "
        f"({f['whole_rows_kept']} whole rows kept; no output file, no temporary file).",
        f"- After making room, `--resume`: exit code {res['exit_code']}; files: {res['files_left']}; rows identical to "
        f"a run on a normal disk: **{res['rows_equal_reference']}**.",
        f"- Read-only folder: exit code **{ro['exit_code']}**; stderr: `{ro['message']}`; files left: "
        f"{ro['files_left']}.",
        "",
    ]


def _operating(r: dict[str, Any]) -> list[str]:
    a = r["server"]["admission"]
    return [
        "## Operating it",
        "",
        "| setting | default | what it does |",
        "|---|---|---|",
        f"| `SNODEVIT_DRAIN_S` | 25 | after SIGTERM, how long admitted requests get to finish; keep it below the "
        "orchestrator's grace period (Kubernetes `terminationGracePeriodSeconds`, 30 s by default) |",
        "| `SNODEVIT_MAX_QUEUE_WAIT_S` | 1 | the admission limit is the throughput measured at start times this "
        f"(here {a['max_in_flight']} requests); 429 with `Retry-After` beyond |",
        "| `SNODEVIT_MAX_CONCURRENCY` | 64 | the hard cap on requests in progress, whatever the throughput |",
        "",
        "- The drain: on SIGTERM the worker marks itself draining (`/readyz` 503 `shutting_down` from that instant), "
        "answers new requests 503 `shutting_down` with `Retry-After: 1`, lets the admitted ones finish (those still "
        "running at `SNODEVIT_DRAIN_S` get 503), keeps refusing for one more second, then hands the signal to "
        "uvicorn, whose own graceful shutdown finds nothing left, runs BentoML's shutdown hook (the engine closes) "
        "and exits; the arbiter exits 0. uvicorn alone stops accepting at the signal: under `bentoml serve` the "
        "listening socket belongs to the arbiter, so requests sent after that point wait unanswered and are reset "
        "when it exits.",
        "- After the worker has stopped listening (the last second of the shutdown) a request sent to this replica "
        "is reset. A load balancer that watches `/readyz` has stopped sending by then; a `preStop` sleep of a few "
        "seconds covers those that have not.",
        "- `Retry-After` on a 429 is the whole seconds the requests in progress take at the measured rate (at least "
        "1). The limit counts requests; a `/classify_batch` request counts once.",
        "",
    ]


def _closing(r: dict[str, Any]) -> list[str]:
    missed = [g for g, _, _, ok in goals(r) if not ok]
    d, c, s = r["server"]["drain"], r["server"]["crash"], r["soak"]
    return [
        "## Closing note",
        "",
        f"SIGTERM under load lost {d['no_answer']} requests and exited {d['exit_code']} after {d['exit_s']} s, "
        f"{d['in_progress_at_sigterm_answered_200']} in-progress requests answered and "
        f"{d['refused_503_shutting_down']} new ones refused with 503. A kill -9 of the worker lost the "
        f"{c['in_progress_at_kill_lost']} requests it held and the server was ready again after {c['recovery_s']} s, "
        f"never ready before. The {s['duration_s'] / 60:.1f}-minute soak at concurrency {s['concurrency']} answered "
        f"{s['statuses']} ({s['errors_beyond_429']} errors beyond 429), admitted p50 {s['p50_ms']} ms and p99 "
        f"{s['p99_ms']} ms, worker RSS {s['memory']['worker']['second_half_growth_pct']:+.2f} % over the second half. "
        "Every broken model stayed not ready with its reason; `snodevit score` on a full or read-only disk exited 74 "
        "with the kernel's reason, left no half-written file, and resumed to the same rows. "
        + (f"Goals missed: {'; '.join(missed)}." if missed else "Every goal of issue 20 is met on this run.")
        + (f" This was a quick run: its soak lasted {s['duration_s']:.0f} s, not 10 minutes." if r["quick"] else ""),
        "",
    ]


def markdown(r: dict[str, Any]) -> str:
    """The whole page."""
    parts = [_intro(r), _drain(r), _crash(r), _soak(r), _broken(r), _score(r), _operating(r), _closing(r)]
    return "\n".join(line for part in parts for line in part)
