"""Run popserv, Dovecot, Postfix and Twisted's own servers through the same scenarios.

Usage::

    python3 bench/run.py [--quick] [--only SCENARIO[,SCENARIO]] [--peers popserv,dovecot,...]

Generates the data if needed (bench/gen.py), builds one Maildir tree per server with hard
links to the same files and one users file per server with the same ``{PLAIN}``
passwords, then, for each scenario, repetition and server, starts the server afresh,
runs the load client (bench/pop3load.py, bench/smtpload.py) and reads the server's CPU
time and memory from /proc.  Prints one markdown table -- medians of the repetitions,
their spread, and the ratio popserv/peer of each row -- and writes it with the raw
numbers to bench/results/.  Everything listens on 127.0.0.1 only; it needs root (Dovecot
and Postfix are started with their own configuration and drop to their users).

POP3S peers (popserv, popserv-w2, dovecot) serve one self-signed RSA-2048 certificate
made at the start of the run.

Scenarios: sessions, download, idle, bigdrop, smtp, stream, tls, tlsdownload, argon2, login
(see bench/README.rst).  ``--peers popserv,popserv-ha1,popserv-ha2`` adds popserv nodes in
cluster mode behind HAProxy (one and two nodes, with a PostgreSQL of their own).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gen  # noqa: E402
import peers  # noqa: E402
import procstat  # noqa: E402

SCENARIOS = (
    "sessions",
    "download",
    "idle",
    "bigdrop",
    "smtp",
    "stream",
    "tls",
    "tlsdownload",
    "argon2",
    "login",
)
#: Scenarios whose servers listen for POP3S too.
TLS_SCENARIOS = ("tls", "tlsdownload")
PEERS = ("popserv", "popserv-w2", "dovecot", "dovecot-cache", "postfix", "twisted")
#: Peers run only when asked for (--peers): popserv nodes behind HAProxy.
CLUSTER_PEERS = ("popserv-ha1", "popserv-ha2")

SETTINGS = {
    "full": dict(
        reps=3,
        duration=8.0,
        idle=1000,
        hold=4.0,
        smtp_duration=8.0,
        later=3,
        argon2_users=200,
        argon2_duration=10.0,
    ),
    "quick": dict(
        reps=1,
        duration=3.0,
        idle=300,
        hold=2.0,
        smtp_duration=3.0,
        later=2,
        argon2_users=40,
        argon2_duration=3.0,
    ),
}

#: row -> (label, unit, "higher" or "lower" is better)
ROWS = {
    "sessions_rate": ("1. sessions/s, 8 clients", "sessions/s", "higher"),
    "sessions_cpu": ("1. server CPU per session", "ms", "lower"),
    "dl1_rate": ("2. download mixed, 1 RETR at a time", "MB/s", "higher"),
    "dl1_cpu": ("2. ... server CPU", "s/GB", "lower"),
    "dl8_rate": ("2. download mixed, 8 RETRs pipelined", "MB/s", "higher"),
    "dl8_cpu": ("2. ... server CPU", "s/GB", "lower"),
    "huge_rate": ("2. download 5 MiB messages", "MB/s", "higher"),
    "huge_cpu": ("2. ... server CPU", "s/GB", "lower"),
    "idle_mem": ("3. memory per idle session", "KiB", "lower"),
    "idle_login": ("3. time to log in all idle sessions", "s", "lower"),
    "big_first": ("4. big maildrop: first login to STAT", "ms", "lower"),
    "big_later": ("4. big maildrop: later login to STAT", "ms", "lower"),
    "big_uidl": ("4. big maildrop: UIDL of all", "ms", "lower"),
    "big_list": ("4. big maildrop: LIST of all", "ms", "lower"),
    "smtp_rate": ("5. SMTP 10 KiB messages, 8 senders", "msg/s", "higher"),
    "smtp_cpu": ("5. ... server CPU per message", "ms", "lower"),
    "stream_mem": ("6. memory growth, RETR of 50 MB", "MiB", "lower"),
    "stall_mem": ("6. memory growth, 50 MB RETR not read", "MiB", "lower"),
    "tls_rate": (
        "7. POP3S sessions/s (RSA-2048 certificate, {PLAIN} users), 8 clients, full handshakes",
        "sessions/s",
        "higher",
    ),
    "tls_cpu": ("7. ... server CPU per session", "ms", "lower"),
    "tlsr_rate": (
        "7. POP3S sessions/s, each client resuming its last session",
        "sessions/s",
        "higher",
    ),
    "tlsr_cpu": ("7. ... server CPU per session", "ms", "lower"),
    "tlsr_reused": ("7. ... reconnections that resumed", "%", "higher"),
    "tlshuge_rate": ("8. POP3S download 5 MiB messages", "MB/s", "higher"),
    "tlshuge_cpu": ("8. ... server CPU", "s/GB", "lower"),
    "argon2_cold_rate": ("9. ARGON2ID users: first logins, 8 at a time", "logins/s", "higher"),
    "argon2_cold_cpu": ("9. ... server CPU per login", "ms", "lower"),
    "argon2_rate": (
        "9. ARGON2ID users: repeat logins, 8 clients, first window",
        "logins/s",
        "higher",
    ),
    "argon2_cpu": ("9. ... server CPU per login", "ms", "lower"),
    "argon2_next_rate": ("9. ARGON2ID users: repeat logins, next window", "logins/s", "higher"),
    "argon2_next_cpu": ("9. ... server CPU per login", "ms", "lower"),
    "login_median": ("10. one client's logins, one at a time: USER to +OK, median", "ms", "lower"),
    "login_p90": ("10. ... 90th percentile", "ms", "lower"),
}


class Failed(Exception):
    """A check failed: the server sent something wrong, or a client broke."""


def client(tool: str, *args, timeout: float = 600) -> dict:
    """Run a load client to completion and return its JSON result."""
    argv = [sys.executable, os.path.join(HERE, tool), *map(str, args)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise Failed(f"{tool} {args[0]}: no result\n{proc.stderr[-2000:]}") from None
    if "error" in result:
        raise Failed(f"{tool} {args[0]}: {result['error']}")
    return result


def start_options(scenario: str) -> dict:
    """What ``Peer.start`` needs for a scenario: an SMTP listener, a POP3S one."""
    return dict(smtp=scenario == "smtp", tls=scenario in TLS_SCENARIOS)


def pop3s(peer, mode: str, user: str, *args, **kwargs) -> dict:
    """A load client on the peer's POP3S port."""
    return client(
        "pop3load.py",
        mode,
        "--tls",
        "--port",
        peer.pop3s_port,
        "--user",
        user,
        "--password",
        peers.PASSWORD,
        *args,
        **kwargs,
    )


def pop3(peer, mode: str, user: str, *args, **kwargs) -> dict:
    return client(
        "pop3load.py",
        mode,
        "--port",
        peer.pop3_port,
        "--user",
        user,
        "--password",
        peers.PASSWORD,
        *args,
        **kwargs,
    )


class Popen:
    """A load client that prints READY, then waits (idle, stall)."""

    def __init__(self, tool: str, *args):
        argv = [sys.executable, os.path.join(HERE, tool), *map(str, args)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def ready(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("READY"):
                return json.loads(line[5:])
            if line.startswith("{"):
                raise Failed(f"client ended early: {line.strip()}")
        raise Failed(f"client ended early: {self.proc.stderr.read()[-2000:]}")

    def finish(self, timeout: float = 120) -> dict:
        out, err = self.proc.communicate("\n", timeout=timeout)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise Failed(f"client: no result\n{err[-2000:]}") from None


class Bench:
    def __init__(self, args):
        self.quick = args.quick
        self.profile = "quick" if args.quick else "full"
        self.settings = dict(SETTINGS[self.profile])
        if args.reps:
            self.settings["reps"] = args.reps
        self.values: dict[tuple[str, str], list[float]] = {}
        self.notes: list[str] = []
        #: peer -> the TLS versions and ciphers its POP3S sessions negotiated.
        self.tls_seen: dict[str, set[str]] = {}
        self.data = gen.generate(self.profile, args.seed)
        self.sets = {
            name: sorted(
                os.path.join(self.data, "sets", name, m["name"])
                for m in gen.load_manifest(self.profile, name)
            )
            for name in ("mixed", "huge", "big", "stream")
        }
        self.scenarios = args.only.split(",") if args.only else list(SCENARIOS)
        self.peers = self._make_peers(args.peers.split(","))

    def _make_peers(self, names: list[str]):
        root = os.path.join(self.data, "servers")
        made = []
        for name in names:
            if name == "popserv":
                made.append(peers.Popserv(root))
            elif name == "popserv-w2":
                if peers.PopservWorkers.available():
                    made.append(peers.PopservWorkers(root))
                else:
                    self.notes.append(
                        "popserv-w2 is unavailable: this checkout's popserv has no "
                        "[server] workers yet."
                    )
            elif name in CLUSTER_PEERS:
                kind = peers.PopservCluster if name == "popserv-ha1" else peers.PopservCluster2
                if kind.available():
                    made.append(kind(root))
                else:
                    self.notes.append(
                        f"{name} is unavailable: it needs haproxy, PostgreSQL and [cluster]."
                    )
            elif name == "twisted":
                made.append(peers.TwistedPeer(root))
            elif name in ("dovecot", "dovecot-cache"):
                kind = peers.Dovecot if name == "dovecot" else peers.DovecotCache
                if kind.available():
                    made.append(kind(root))
                else:
                    self.notes.append(f"Dovecot is not installed: no {name} column.")
            elif name == "postfix":
                if peers.Postfix.available():
                    made.append(peers.Postfix(root))
                else:
                    self.notes.append("Postfix is not installed: SMTP compares with twisted only.")
            else:
                known = ", ".join(PEERS + CLUSTER_PEERS)
                raise SystemExit(f"unknown peer {name!r}; known: {known}")
        return made

    def mailboxes(self) -> dict[str, tuple[list[str], str]]:
        boxes = {f"sess{i}": (self.sets["mixed"], "cur") for i in range(8)}
        boxes["dl"] = (self.sets["mixed"], "cur")
        boxes["huge"] = (self.sets["huge"], "cur")
        boxes["stream"] = (self.sets["stream"], "cur")
        small = self.sets["big"][:10]
        for i in range(self.settings["idle"]):
            boxes[f"idle{i:04d}"] = (small, "cur")
        for rep in range(self.settings["reps"]):
            boxes[f"big{rep}"] = (self.sets["big"], "new")
        for i in range(8):
            boxes[f"smtp{i}"] = ([], "new")
        for user in self.argon2_users():
            boxes[user] = (small, "cur")
        return boxes

    def argon2_users(self) -> list[str]:
        if "argon2" not in self.scenarios:
            return []
        return [f"argon{i:03d}" for i in range(self.settings["argon2_users"])]

    def warm_users(self, peer) -> list[str]:
        argon2 = self.argon2_users() if peer.argon2 else []
        if peer.only == ("argon2",):
            return argon2
        users = [f"sess{i}" for i in range(8)] + ["dl", "huge", "stream"]
        users += [f"idle{i:04d}" for i in range(self.settings["idle"])]
        return users + argon2

    def hashed_passwords(self) -> dict[str, str]:
        """One ``{ARGON2ID}`` hash per Argon2 user, as ``popserv adduser`` makes them.

        popserv's own ``hash_password`` (argon2-cffi's defaults: m=65536 KiB, t=3, p=4),
        kept in the data directory so later runs skip the hashing.
        """
        users = self.argon2_users()
        if not users:
            return {}
        path = os.path.join(self.data, "argon2-users.json")
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = {}
        if saved.get("password") != peers.PASSWORD or not set(users) <= set(saved["hashes"]):
            if peers.REPO not in sys.path:
                sys.path.insert(0, peers.REPO)
            from popserv.auth import hash_password

            saved = {
                "password": peers.PASSWORD,
                "hashes": {user: hash_password(peers.PASSWORD) for user in users},
            }
            with open(path, "w") as f:
                json.dump(saved, f, indent=1)
        return {user: saved["hashes"][user] for user in users}

    # -- running -------------------------------------------------------------

    def record(self, row: str, peer, value: float) -> None:
        self.values.setdefault((row, peer.name), []).append(value)

    def prepare(self) -> None:
        """Build every server's tree and do each one's first-login work."""
        started = time.monotonic()
        boxes = self.mailboxes()
        hashed = self.hashed_passwords()
        cert, key = peers.make_certificate(os.path.join(self.data, "tls"))
        for peer in self.peers:
            peer.build(boxes, hashed)
            peer.cert, peer.key = cert, key
            if peer.pop3:
                # Each server's first-login work (indexes, size caches) happens here, once,
                # in a process of its own, so that it weighs on no measurement below.
                peer.start()
                try:
                    result = pop3(peer, "warm", ",".join(self.warm_users(peer)))
                    if result["error_count"]:
                        self.notes.append(f"{peer.name}: warm-up logins failed: {result['errors']}")
                finally:
                    peer.stop()
        print(f"bench: data ready in {time.monotonic() - started:.0f}s", file=sys.stderr)

    def run(self) -> None:
        started = time.monotonic()
        self.prepare()
        for scenario in self.scenarios:
            for rep in range(self.settings["reps"]):
                for peer in self.peers:
                    if not self._takes_part(peer, scenario, rep):
                        continue
                    t0 = time.monotonic()
                    try:
                        peer.start(**start_options(scenario))
                        getattr(self, "scenario_" + scenario)(peer, rep)
                    except (Failed, RuntimeError, subprocess.TimeoutExpired) as e:
                        self.notes.append(f"{peer.name} {scenario} (repetition {rep + 1}): {e}")
                    finally:
                        peer.stop()
                    print(
                        f"bench: {scenario} #{rep + 1} {peer.name}: {time.monotonic() - t0:.1f}s",
                        file=sys.stderr,
                    )
        for peer in self.peers:
            cleanup = getattr(peer, "cleanup", None)
            if cleanup is not None:
                cleanup()
        self.elapsed = time.monotonic() - started

    def _takes_part(self, peer, scenario: str, rep: int) -> bool:
        if peer.only is not None and scenario not in peer.only:
            return False
        if scenario in TLS_SCENARIOS:
            return peer.pop3s
        if scenario == "argon2":
            return peer.argon2
        if scenario == "login":
            return peer.name.startswith("popserv")
        if scenario == "smtp":
            if peer.name == "popserv" and not peer.smtp:
                if rep == 0:
                    self.notes.append(
                        "popserv has no --smtp option yet: SMTP scenario skipped for popserv."
                    )
                return False
            return peer.smtp
        return peer.pop3

    # -- scenarios -------------------------------------------------------------

    def scenario_sessions(self, peer, rep: int) -> None:
        users = ",".join(f"sess{i}" for i in range(8))
        pop3(peer, "warm", users)
        before = peer.cpu()
        r = pop3(peer, "sessions", users, "--clients", 8, "--duration", self.settings["duration"])
        cpu = peer.cpu() - before
        if r["error_count"] or not r["sessions"]:
            raise Failed(f"{r['error_count']} failed sessions: {r['errors']}")
        self.record("sessions_rate", peer, r["sessions"] / r["wall"])
        self.record("sessions_cpu", peer, cpu * 1000 / r["sessions"])

    def scenario_login(self, peer, rep: int) -> None:
        """One client, one session at a time: what a login costs in latency, not in rate."""
        users = ",".join(f"sess{i}" for i in range(8))
        r = client(
            "pop3load.py",
            "logins",
            "--port",
            peer.login_target(),
            "--user",
            users,
            "--password",
            peers.PASSWORD,
            "--duration",
            self.settings["duration"],
        )
        self.record("login_median", peer, r["median_ms"])
        self.record("login_p90", peer, r["p90_ms"])

    def scenario_tls(self, peer, rep: int) -> None:
        users = ",".join(f"sess{i}" for i in range(8))
        pop3s(peer, "warm", users)
        for row, resume in (("tls", []), ("tlsr", ["--resume"])):
            before = peer.cpu()
            r = pop3s(
                peer,
                "sessions",
                users,
                "--clients",
                8,
                "--duration",
                self.settings["duration"],
                *resume,
            )
            cpu = peer.cpu() - before
            if r["error_count"] or not r["sessions"]:
                raise Failed(f"{r['error_count']} failed POP3S sessions: {r['errors']}")
            self.tls_seen.setdefault(peer.name, set()).update(r["tls"])
            self.record(row + "_rate", peer, r["sessions"] / r["wall"])
            self.record(row + "_cpu", peer, cpu * 1000 / r["sessions"])
            self.record(row + "_client_cpu", peer, r["client_cpu"] * 1000 / r["sessions"])
            if resume:
                self.record("tlsr_reused", peer, 100 * r["resumed"] / max(r["offered"], 1))

    def scenario_tlsdownload(self, peer, rep: int) -> None:
        pop3s(peer, "warm", "huge")
        extra = []
        if rep == 0:
            extra = ["--manifest", os.path.join(self.data, "sets", "huge.json")]
        before = peer.cpu()
        r = pop3s(peer, "download", "huge", *extra)
        cpu = peer.cpu() - before
        expected = len(self.sets["huge"])
        if r["messages"] != expected:
            raise Failed(f"huge: LIST shows {r['messages']} messages, not {expected}")
        if r["size_mismatches"]:
            raise Failed(f"huge: {r['size_mismatches']} RETRs differ from their LIST sizes")
        if r.get("content_ok") is False:
            raise Failed("huge: message contents differ from the generated ones")
        self.record("tlshuge_rate", peer, r["octets"] / 1e6 / r["wall"])
        self.record("tlshuge_cpu", peer, cpu / (r["octets"] / 1e9))
        self.record("tlshuge_client_cpu", peer, r["client_cpu"] / (r["octets"] / 1e9))

    def scenario_argon2(self, peer, rep: int) -> None:
        users = ",".join(self.argon2_users())
        # Every user's first login on a fresh server: no cache holds anything yet.
        before = peer.cpu()
        r = pop3(peer, "warm", users, "--concurrency", 8)
        cpu = peer.cpu() - before
        if r["error_count"]:
            raise Failed(f"{r['error_count']} first logins failed: {r['errors']}")
        self.record("argon2_cold_rate", peer, r["users"] / r["wall"])
        self.record("argon2_cold_cpu", peer, cpu * 1000 / r["users"])
        # Then the population polls: each client logs its share of the users in by turns,
        # for two windows in a row.  The second shows how far caches kept per process (one
        # per popserv worker) have got with every user.
        for row in ("argon2", "argon2_next"):
            before = peer.cpu()
            r = pop3(
                peer,
                "sessions",
                users,
                "--clients",
                8,
                "--duration",
                self.settings["argon2_duration"],
            )
            cpu = peer.cpu() - before
            if r["error_count"] or not r["sessions"]:
                raise Failed(f"{r['error_count']} failed logins: {r['errors']}")
            self.record(row + "_rate", peer, r["sessions"] / r["wall"])
            self.record(row + "_cpu", peer, cpu * 1000 / r["sessions"])
        entries = getattr(peer, "auth_cache_entries", None)
        if entries is not None:
            note = (
                f"{peer.name}: {entries()} authentication cache entries after the argon2 "
                f"logins (repetition {rep + 1})"
            )
            self.notes.append(note)

    def scenario_download(self, peer, rep: int) -> None:
        pop3(peer, "warm", "dl,huge")
        runs = (("dl1", "dl", 1, "mixed"), ("dl8", "dl", 8, "mixed"), ("huge", "huge", 1, "huge"))
        for row, user, depth, set_name in runs:
            extra = []
            if rep == 0:
                extra = ["--manifest", os.path.join(self.data, "sets", set_name + ".json")]
            before = peer.cpu()
            try:
                r = pop3(peer, "download", user, "--pipeline", depth, *extra)
            except Failed as e:
                # One broken download (say, a reply that ends early) spoils only its rows.
                self.notes.append(
                    f"{peer.name} download {user} x{depth} (repetition {rep + 1}): {e}"
                )
                continue
            cpu = peer.cpu() - before
            expected = len(self.sets[set_name])
            if r["messages"] != expected:
                raise Failed(f"{user}: LIST shows {r['messages']} messages, not {expected}")
            if r["size_mismatches"]:
                note = (
                    f"{peer.name}: RETR octets differ from LIST sizes for "
                    f"{r['size_mismatches']} of {expected} messages ({user}); "
                    f"e.g. (number, listed, sent) {r['first_mismatches'][:2]}"
                )
                if note not in self.notes:
                    self.notes.append(note)
            if r.get("content_ok") is False:
                raise Failed(f"{user}: message contents differ from the generated ones")
            self.record(row + "_rate", peer, r["octets"] / 1e6 / r["wall"])
            self.record(row + "_cpu", peer, cpu / (r["octets"] / 1e9))

    def scenario_idle(self, peer, rep: int) -> None:
        pop3(peer, "warm", "stream")
        time.sleep(0.5)
        base = peer.memory()
        count = self.settings["idle"]
        idle = Popen(
            "pop3load.py",
            "idle",
            "--port",
            peer.pop3_port,
            "--user",
            "idle",
            "--password",
            peers.PASSWORD,
            "--clients",
            count,
        )
        try:
            ready = idle.ready()
            time.sleep(1.0)
            used = peer.memory() - base
        finally:
            r = idle.finish()
        if ready["sessions"] != count or r.get("alive_after_idle") != count:
            raise Failed(
                f"{ready['sessions']} of {count} idle sessions logged in, "
                f"{r.get('alive_after_idle')} alive after; {ready['errors']}"
            )
        self.record("idle_mem", peer, used / count / 1024)
        self.record("idle_login", peer, ready["wall"])

    def scenario_bigdrop(self, peer, rep: int) -> None:
        user = f"big{rep}"
        r = pop3(peer, "bigdrop", user, "--later", self.settings["later"])
        expected = len(self.sets["big"])
        if not (r["messages"] == r["uidl_count"] == r["list_count"] == expected):
            raise Failed(
                f"{user}: STAT/UIDL/LIST count {r['messages']}/{r['uidl_count']}/"
                f"{r['list_count']}, expected {expected}"
            )
        if r["unique_uidls"] != expected:
            raise Failed(f"{user}: only {r['unique_uidls']} distinct UIDLs")
        self.record("big_first", peer, r["first_login"] * 1000)
        self.record("big_later", peer, r["later_login"] * 1000)
        self.record("big_uidl", peer, r["uidl"] * 1000)
        self.record("big_list", peer, r["list"] * 1000)

    def scenario_smtp(self, peer, rep: int) -> None:
        users = [f"smtp{i}" for i in range(8)]
        already = sum(peer.delivered(u) for u in users)
        before = peer.cpu()
        r = client(
            "smtpload.py",
            "--port",
            peer.smtp_port,
            "--senders",
            8,
            "--duration",
            self.settings["smtp_duration"],
        )
        if r["error_count"] or not r["accepted"]:
            raise Failed(f"{r['error_count']} senders failed: {r['errors']}")
        wait_start = time.monotonic()
        target = already + r["accepted"]
        while sum(peer.delivered(u) for u in users) < target:
            if time.monotonic() - wait_start > 120:
                found = sum(peer.delivered(u) for u in users) - already
                raise Failed(f"only {found} of {r['accepted']} accepted messages on disk")
            time.sleep(0.02)
        late = time.monotonic() - wait_start
        cpu = peer.cpu() - before
        found = sum(peer.delivered(u) for u in users) - already
        if found != r["accepted"]:
            raise Failed(f"{found} files on disk for {r['accepted']} accepted messages")
        self.record("smtp_rate", peer, r["accepted"] / (r["wall"] + late))
        self.record("smtp_cpu", peer, cpu * 1000 / r["accepted"])

    def scenario_stream(self, peer, rep: int) -> None:
        pop3(peer, "retr", "dl")  # the RETR code paths are loaded and warm
        time.sleep(0.3)
        base = peer.memory()
        peer.reset_peak()
        with procstat.Sampler(peer.memory) as sampler:
            r = pop3(peer, "retr", "stream")
        if not r["size_ok"]:
            self.notes.append(
                f"{peer.name} stream (repetition {rep + 1}): 50 MB RETR sent "
                f"{r['octets']} octets for {r['listed']} listed"
            )
        self.record("stream_mem", peer, (max(sampler.peak, peer.peak_memory()) - base) / 2**20)
        time.sleep(0.3)
        base = peer.memory()
        peer.reset_peak()
        hold = self.settings["hold"]
        with procstat.Sampler(peer.memory) as sampler:
            stall = Popen(
                "pop3load.py",
                "stall",
                "--port",
                peer.pop3_port,
                "--user",
                "stream",
                "--password",
                peers.PASSWORD,
                "--hold",
                hold,
            )
            stall.ready()
            r = stall.finish(timeout=hold + 60)
        if "error" in r:
            raise Failed(f"stalled RETR: {r['error']}")
        self.record("stall_mem", peer, (max(sampler.peak, peer.peak_memory()) - base) / 2**20)

    # -- report ----------------------------------------------------------------

    def table(self) -> str:
        names = [p.name for p in self.peers]
        mine = [n for n in names if n.startswith("popserv")]
        others = [n for n in names if not n.startswith("popserv")]
        ratios = [(m, n) for m in mine for n in others]
        head = ["scenario", "unit", *names] + [f"{m}/{n}" for m, n in ratios]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row, (label, unit, better) in ROWS.items():
            cells = {}
            for name in names:
                vals = self.values.get((row, name))
                cells[name] = vals
            if not any(cells.values()):
                continue
            arrow = "↑" if better == "higher" else "↓"
            out = [label, f"{unit} {arrow}"]
            for name in names:
                out.append(_cell(cells[name]))
            for m, n in ratios:
                ours, theirs = cells[m], cells[n]
                if ours and theirs and statistics.median(theirs):
                    out.append(f"{statistics.median(ours) / statistics.median(theirs):.2f}")
                else:
                    out.append("–")
            lines.append("| " + " | ".join(out) + " |")
        return "\n".join(lines)

    def report(self) -> str:
        reps = self.settings["reps"]
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cpu = _cpu_model()
        how_many = f"median of {reps} repetitions" if reps > 1 else "1 repetition"
        text = [
            f"Machine: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}; {when}; profile {self.profile}, "
            f"{how_many} "
            f"(± is half the range over the median); run took {self.elapsed / 60:.1f} min.",
            "",
            self.table(),
        ]
        notes = list(self.notes)
        if self.tls_seen:
            notes.append(
                "POP3S negotiated: "
                + "; ".join(
                    f"{name}: {', '.join(sorted(seen))}" for name, seen in self.tls_seen.items()
                )
            )
        if notes:
            text += ["", "Notes:", ""] + [f"- {n}" for n in notes]
        return "\n".join(text)


def _cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    median = statistics.median(values)
    text = _fmt(median)
    if len(values) > 1 and median:
        spread = (max(values) - min(values)) / 2 / abs(median) * 100
        text += f" ±{spread:.0f}%"
    return text


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller sets, shorter runs, 1 repetition (about 4 minutes)",
    )
    parser.add_argument("--only", help=f"comma-separated scenarios out of {', '.join(SCENARIOS)}")
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"comma-separated servers (default: {','.join(PEERS)})",
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 3, --quick 1)")
    parser.add_argument("--seed", type=int, default=1939)
    args = parser.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(SCENARIOS)
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        parser.error("run as root: Dovecot and Postfix start as root and drop privileges")
    procstat.raise_nofile()
    bench = Bench(args)
    bench.run()
    report = bench.report()
    print(report)
    results = os.path.join(HERE, "results")
    os.makedirs(results, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(results, f"{stamp}-{bench.profile}.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(results, f"{stamp}-{bench.profile}.json"), "w") as f:
        json.dump(
            {
                "values": {f"{r}/{p}": v for (r, p), v in bench.values.items()},
                "notes": bench.notes,
                "settings": bench.settings,
            },
            f,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
