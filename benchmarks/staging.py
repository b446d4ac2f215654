#!/usr/bin/env python3
"""
Staging throughput and memory against a real nginx on loopback.

    python benchmarks/staging.py [--runs 3] [--dir DIR] [--size-mib 1024]
                                 [--shared-mib 200] [--tasks 500]
                                 [--only download,upload,share] [--json FILE]

Prints, in one run:

 1. download of a 1 GiB input: the agent's MB/s, curl's MB/s on the same
    file, and their ratio (medians over --runs, agent and curl alternating);
 2. upload of a 1 GiB output: the agent's MB/s against ``curl -T``;
 3. the agent's peak RSS during each, against its idle RSS (the agent side
    runs in a child process; the parent resets and reads its VmHWM and
    samples VmRSS in /proc/<pid>/status);
 4. 500 tasks sharing one 200 MiB input: the bytes nginx sent for it,
    counted from its access log (goal: exactly 200 MiB, once).

Goals: both ratios >= 0.8, RSS growth < 64 MiB, item 4 exact.  --only runs
some of the parts (download: 1 and its memory; upload: 2 and its memory;
share: 4), and judges only those.

nginx (Debian package nginx-light, installed with apt-get if missing and we
are root) runs from a temporary configuration, on 127.0.0.1 only, with
WebDAV PUT.  By default everything lives in a fresh directory on the
ordinary disk (/var/tmp), where an operator's work_dir is; --dir puts it
elsewhere (--dir /dev/shm measures the agent and curl without the disk).
The CPU goal: the agent's CPU seconds per GiB at most curl's plus this
machine's sha256 cost per GiB (measured in the same run) plus 0.3 s.

The agent side downloads with a sha256 and size (so through the content
cache, verified) and uploads with the sha256 it reports; curl does neither.
For reference it also downloads without sha256 and size (nothing to hash).
Each figure is the median of --runs (agent and curl alternating, each run
in a fresh process); the CPU seconds per GiB (all threads) are printed too,
as they depend much less on other work on the machine than the speeds.

To compare two versions of the agent on the same machine, run this once per
version, interleaved, with EVEREST_BENCH_AGENT_ROOT set to the directory
holding the other version's everest_agent package (default: this tree).
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 1 << 20

NGINX_CONF = """\
worker_processes 1;
daemon on;
pid {root}/nginx.pid;
error_log {root}/logs/error.log;
events {{ worker_connections 1024; }}
http {{
    log_format bench '$request_method $request_uri $status $body_bytes_sent $request_length';
    access_log {root}/logs/access.log bench;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
        location / {{
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 0;
        }}
    }}
}}
"""


# -- the agent side (a child process) ------------------------------------------------


def child(argv):
    """Run one staging job; talk to the parent over stdin/stdout."""
    sys.path.insert(0, os.environ.get("EVEREST_BENCH_AGENT_ROOT") or ROOT)
    from twisted.internet import defer, reactor

    from everest_agent.transfer.stager import Stager

    mode, work = argv[0], argv[1]
    args = json.loads(argv[2])
    cache_dir = os.path.join(work, "cache")
    stager = Stager.with_client(
        reactor, "wss://platform.invalid/agent/v1", "token", timeout=60.0, stall_timeout=60.0,
        max_concurrent=8, cache_dir=cache_dir, cache_size=4 << 30,
    )

    def say(message):
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def run():
        say({"ready": os.getpid()})
        await _readline(reactor)
        start = time.perf_counter()
        if mode == "download":
            task = os.path.join(work, "task")
            os.makedirs(task, exist_ok=True)
            item = {"path": "in.bin", "uri": args["uri"]}
            item.update((k, args[k]) for k in ("size", "sha256") if args.get(k) is not None)
            await stager.stage_in(task, [item])
            seconds = time.perf_counter() - start
            ok = os.path.getsize(os.path.join(task, "in.bin")) == args["expect"]
            result = {"seconds": seconds, "ok": ok}
        elif mode == "upload":
            uploaded, errors = await stager.stage_out(args["task"], [{"path": "out.bin", "uri": args["uri"]}])
            seconds = time.perf_counter() - start
            result = {"seconds": seconds, "ok": not errors, "errors": errors, "uploaded": uploaded}
        else:  # share
            tasks = [os.path.join(work, f"t{i:04d}") for i in range(args["tasks"])]
            for t in tasks:
                os.makedirs(t, exist_ok=True)
            item = {"path": "shared.bin", "uri": args["uri"], "size": args["size"], "sha256": args["sha256"]}
            await defer.gatherResults(
                [defer.ensureDeferred(stager.stage_in(t, [item])) for t in tasks], consumeErrors=True
            )
            seconds = time.perf_counter() - start
            inodes = {os.stat(os.path.join(t, "shared.bin")).st_ino for t in tasks}
            sizes = {os.path.getsize(os.path.join(t, "shared.bin")) for t in tasks}
            result = {"seconds": seconds, "ok": sizes == {args["size"]}, "inodes": len(inodes),
                      "requests": stager.requests, "bytes_in": stager.bytes_in}
        say(result)
        await _readline(reactor)
        await stager.close()

    def main():
        d = defer.ensureDeferred(run())

        def failed(f):
            say({"error": f.getTraceback()})

        d.addErrback(failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(main)
    reactor.run()


def _readline(reactor):
    from twisted.internet import threads

    return threads.deferToThread(sys.stdin.readline)


# -- the driver ---------------------------------------------------------------------------


def cpu_seconds(pid):
    """User + system CPU seconds of process C{pid} so far (all threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def status(pid):
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    values[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return values


class AgentRun:
    """A child process running one staging job, with its memory watched."""

    def __init__(self, mode, work, **args):
        os.makedirs(work, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", mode, work, json.dumps(args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        ready = self._read()
        self.pid = ready["ready"]
        time.sleep(0.2)
        self.idle = status(self.pid)["VmRSS"]
        try:  # reset the peak ("high water mark") to now
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.peak_sampled = self.idle
        self._sampling = True
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent child died (exit {self.proc.wait()})")
        message = json.loads(line)
        if "error" in message:
            raise RuntimeError("agent child failed:\n" + message["error"])
        return message

    def _sample(self):
        while self._sampling:
            rss = status(self.pid).get("VmRSS", 0)
            self.peak_sampled = max(self.peak_sampled, rss)
            time.sleep(0.02)

    def run(self):
        self._sampler.start()
        cpu = cpu_seconds(self.pid)
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        result = self._read()
        result["cpu"] = cpu_seconds(self.pid) - cpu
        self._sampling = False
        self._sampler.join()
        st = status(self.pid)
        result["idle_rss"] = self.idle
        result["peak_rss"] = max(st.get("VmHWM", 0), self.peak_sampled)
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)
        return result


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def ensure_nginx():
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx:
        return nginx
    if os.geteuid() != 0:
        sys.exit("nginx is not installed, and installing it needs root: apt-get install nginx-light")
    print("Installing nginx-light with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "-q", "nginx-light"], env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "nginx-light"], env=env, check=True)
    return shutil.which("nginx") or "/usr/sbin/nginx"


def make_file(path, size):
    """size bytes that do not compress (so nothing can cheat)."""
    block = os.urandom(4 * MiB)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        counter = 0
        while left:
            chunk = block[: min(left, len(block))]
            # Vary each block a little so no two are the same.
            chunk = counter.to_bytes(8, "big") + chunk[8:] if len(chunk) >= 8 else chunk
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
            counter += 1
    return digest.hexdigest()


def settle():
    os.sync()
    time.sleep(0.5)


def curl_download(url, dest):
    """(seconds, bytes, CPU seconds) of one curl download."""
    cpu = children_cpu()
    out = subprocess.run(
        ["curl", "-s", "-S", "-f", "-o", dest, "-w", "%{time_total} %{size_download}", url],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    return float(out[0]), int(out[1]), children_cpu() - cpu


def curl_upload(path, url):
    cpu = children_cpu()
    out = subprocess.run(
        ["curl", "-s", "-S", "-f", "-T", path, "-o", "/dev/null", "-w", "%{time_total} %{size_upload}", url],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    return float(out[0]), int(out[1]), children_cpu() - cpu


def access_log(root):
    entries = []
    with open(os.path.join(root, "logs", "access.log")) as f:
        for line in f:
            method, uri, code, sent, received = line.split()
            entries.append((method, uri, int(code), int(sent), int(received)))
    return entries


def pick_dir(requested, needed):
    """The ordinary disk (/var/tmp) unless told otherwise: that is where an
    operator's work_dir is."""
    where = requested or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
    if where:
        os.makedirs(where, exist_ok=True)
    return tempfile.mkdtemp(prefix="everest-bench-", dir=where)


def sha256_cpu_per_gib():
    """CPU seconds this machine's sha256 takes per GiB (hashing 256 MiB)."""
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    start = time.process_time()
    for _ in range(256):
        digest.update(block)
    return (time.process_time() - start) * 4


def mb(nbytes, seconds):
    return nbytes / seconds / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs of each transfer (medians are reported)")
    parser.add_argument("--dir", help="where to put nginx's files and the tasks (default: /var/tmp, the ordinary disk)")
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the big input/output")
    parser.add_argument("--shared-mib", type=int, default=200, help="size of the shared input")
    parser.add_argument("--tasks", type=int, default=500, help="tasks sharing the input")
    parser.add_argument("--keep", action="store_true", help="keep the directory")
    parser.add_argument("--only", default="download,upload,share",
                        help="parts to run, comma-separated: download, upload, share (default: all)")
    parser.add_argument("--json", help="write the figures to this file")
    options = parser.parse_args()
    options.only = {part.strip() for part in options.only.split(",") if part.strip()}
    unknown = options.only - {"download", "upload", "share"}
    if unknown or not options.only:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown)) or '(none given)'}")

    size = options.size_mib * MiB
    shared_size = options.shared_mib * MiB
    nginx = ensure_nginx()
    if not shutil.which("curl"):
        sys.exit("curl is needed")
    root = pick_dir(options.dir, 4 * size + 2 * shared_size)
    os.chmod(root, 0o755)
    for sub in ("www", "www/up", "tmp", "logs", "agent", "curl"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        os.chmod(os.path.join(root, sub), 0o777)
    port = free_port()
    conf = os.path.join(root, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(root=root, port=port))
    base = f"http://127.0.0.1:{port}"
    fs = subprocess.run(["df", "-T", root], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    print(f"Working in {root} ({fs}); nginx on {base}; {os.cpu_count()} CPUs", flush=True)

    print(f"Making a {options.size_mib} MiB and a {options.shared_mib} MiB file ...", flush=True)
    big_sha = make_file(os.path.join(root, "www", "big.bin"), size)
    shared_sha = make_file(os.path.join(root, "www", "shared.bin"), shared_size)
    for name in ("big.bin", "shared.bin"):
        os.chmod(os.path.join(root, "www", name), 0o644)

    subprocess.run([nginx, "-c", conf, "-p", root], check=True)
    try:
        report = run_all(options, root, base, size, big_sha, shared_size, shared_sha)
    finally:
        subprocess.run([nginx, "-c", conf, "-p", root, "-s", "stop"], check=False, capture_output=True)
        time.sleep(0.3)
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_report(report, options)
    if options.json:
        with open(options.json, "w") as f:
            json.dump(report, f, indent=1)
    ok = all(report[part]["ratio"] >= 0.8 and report[part]["rss_growth"] < 64 * MiB
             for part in ("download", "upload") if part in report)
    ok = ok and ("share" not in report or report["share"]["exact"])
    print("\nAll goals met." if ok else "\nSome goals NOT met.")
    return 0 if ok else 1


def run_all(options, root, base, size, big_sha, shared_size, shared_sha):
    report = {"sha256_cpu": sha256_cpu_per_gib()}
    url = base + "/big.bin"
    # Warm up: the served file into the page cache, nginx's worker, curl.
    curl_download(url, "/dev/null")

    if "download" in options.only:
        report["download"] = run_downloads(options, root, url, size, big_sha)
    if "upload" in options.only:
        report["upload"] = run_uploads(options, root, base, size, big_sha)
    if "share" in options.only:
        report["share"] = run_share(options, root, base, shared_size, shared_sha)
    return report


def run_downloads(options, root, url, size, big_sha):
    """1. downloads: the agent verifying sha256 and size (through its content
    cache), the agent with neither (nothing to hash), and curl."""
    rows = {"agent": Row(), "plain": Row(), "curl": Row()}
    for i in range(options.runs):
        for name in ("agent", "plain"):
            settle()
            work = os.path.join(root, "agent", f"dl{i}{name}")
            checks = {"sha256": big_sha, "size": size} if name == "agent" else {"sha256": None, "size": None}
            result = AgentRun("download", work, uri=url, expect=size, **checks).run()
            assert result["ok"], result
            rows[name].add(size, result)
            shutil.rmtree(work)
        settle()
        dest = os.path.join(root, "curl", "big.bin")
        seconds, got, cpu = curl_download(url, dest)
        assert got == size
        rows["curl"].add(size, {"seconds": seconds, "cpu": cpu})
        os.unlink(dest)
        print(f"  download run {i + 1}: agent {rows['agent'].last():.0f} MB/s {rows['agent'].cpus[-1]:.2f} CPU-s/GiB "
              f"(unverified {rows['plain'].last():.0f}, {rows['plain'].cpus[-1]:.2f}), curl "
              f"{rows['curl'].last():.0f} MB/s {rows['curl'].cpus[-1]:.2f}; agent RSS "
              f"{rows['agent'].idles[-1] / MiB:.1f} -> {rows['agent'].peaks[-1] / MiB:.1f} MiB; "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    return summary(rows["agent"], rows["curl"], rows["plain"])


def run_uploads(options, root, base, size, big_sha):
    """2. uploads: the agent (computing the sha256 it reports) and curl -T."""
    task = os.path.join(root, "agent", "uptask")
    os.makedirs(task)
    os.link(os.path.join(root, "www", "big.bin"), os.path.join(task, "out.bin"))
    rows = {"agent": Row(), "curl": Row()}
    for i in range(options.runs):
        settle()
        target = f"/up/agent-{i}.bin"
        result = AgentRun("upload", os.path.join(root, "agent", f"ul{i}"), task=task, uri=base + target).run()
        assert result["ok"], result
        assert result["uploaded"][0]["sha256"] == big_sha, result
        assert os.path.getsize(os.path.join(root, "www", target.lstrip("/"))) == size
        rows["agent"].add(size, result)
        os.unlink(os.path.join(root, "www", target.lstrip("/")))
        settle()
        target = f"/up/curl-{i}.bin"
        seconds, sent, cpu = curl_upload(os.path.join(task, "out.bin"), base + target)
        assert sent == size
        rows["curl"].add(size, {"seconds": seconds, "cpu": cpu})
        os.unlink(os.path.join(root, "www", target.lstrip("/")))
        print(f"  upload run {i + 1}: agent {rows['agent'].last():.0f} MB/s {rows['agent'].cpus[-1]:.2f} CPU-s/GiB, "
              f"curl {rows['curl'].last():.0f} MB/s {rows['curl'].cpus[-1]:.2f}; load {os.getloadavg()[0]:.2f}; "
              f"agent RSS {rows['agent'].idles[-1] / MiB:.1f} -> {rows['agent'].peaks[-1] / MiB:.1f} MiB", flush=True)
    return summary(rows["agent"], rows["curl"])


def run_share(options, root, base, shared_size, shared_sha):
    """4. many tasks, one input."""
    settle()
    before = len(access_log(root))
    work = os.path.join(root, "agent", "share")
    result = AgentRun("share", work, uri=base + "/shared.bin", size=shared_size, sha256=shared_sha,
                      tasks=options.tasks).run()
    assert result["ok"], result
    entries = [e for e in access_log(root)[before:] if e[1] == "/shared.bin"]
    sent = sum(e[3] for e in entries)
    return {
        "tasks": options.tasks, "requests": len(entries), "bytes": sent, "expected": shared_size,
        "exact": sent == shared_size and len(entries) == 1, "seconds": result["seconds"],
        "inodes": result["inodes"], "rss_growth": result["peak_rss"] - result["idle_rss"],
    }


class Row:
    """The runs of one contender."""

    def __init__(self):
        self.speeds, self.cpus, self.growths, self.peaks, self.idles = [], [], [], [], []

    def add(self, nbytes, result):
        self.speeds.append(mb(nbytes, result["seconds"]))
        self.cpus.append(result["cpu"] / (nbytes / (1 << 30)))
        if "peak_rss" in result:
            self.growths.append(result["peak_rss"] - result["idle_rss"])
            self.peaks.append(result["peak_rss"])
            self.idles.append(result["idle_rss"])

    def last(self):
        return self.speeds[-1]


def summary(agent, curl, plain=None):
    a, c = statistics.median(agent.speeds), statistics.median(curl.speeds)
    out = {
        "agent": a, "curl": c, "ratio": a / c, "best_ratio": max(agent.speeds) / max(curl.speeds), "agent_runs": agent.speeds, "curl_runs": curl.speeds,
        "agent_cpu": statistics.median(agent.cpus), "curl_cpu": statistics.median(curl.cpus),
        "rss_growth": max(agent.growths), "peak_rss": max(agent.peaks), "idle_rss": min(agent.idles),
    }
    if plain is not None:
        out.update(plain=statistics.median(plain.speeds), plain_runs=plain.speeds,
                   plain_cpu=statistics.median(plain.cpus), plain_growth=max(plain.growths))
    return out


def print_report(report, options):
    d, u, s = report.get("download"), report.get("upload"), report.get("share")
    runs = lambda xs: ", ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    load = os.getloadavg()
    print()
    print(f"Load average during the run: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs "
          "(other work on the machine lowers every figure).")
    if d is not None:
        print(f"1. Download {options.size_mib} MiB (median of {options.runs}; CPU seconds per GiB, all threads):")
        print(f"     agent {d['agent']:7.0f} MB/s  cpu {d['agent_cpu']:4.2f} s  [{runs(d['agent_runs'])}]  "
              "(verifies sha256 and size)")
        print(f"     curl  {d['curl']:7.0f} MB/s  cpu {d['curl_cpu']:4.2f} s  [{runs(d['curl_runs'])}]")
        print(f"     ratio {d['ratio']:7.2f}  cpu {d['agent_cpu']:.2f} against {d['curl_cpu']:.2f} s per GiB  "
              f"(goal >= 0.8; best run against best run: {d['best_ratio']:.2f})")
        budget = d["curl_cpu"] + report["sha256_cpu"] + 0.3
        print(f"     cpu budget {budget:4.2f} s = curl {d['curl_cpu']:.2f} + sha256 {report['sha256_cpu']:.2f} + 0.3: "
              f"{'met' if d['agent_cpu'] <= budget else 'NOT met'}; ratio goal {'met' if d['ratio'] >= 0.8 else 'NOT met'}")
        print(f"     (agent without sha256/size, nothing to hash: {d['plain']:.0f} MB/s, cpu {d['plain_cpu']:.2f} s, "
              f"ratio {d['plain'] / d['curl']:.2f}  [{runs(d['plain_runs'])}])")
    if u is not None:
        print(f"2. Upload {options.size_mib} MiB (median of {options.runs}; CPU seconds per GiB, all threads):")
        print(f"     agent {u['agent']:7.0f} MB/s  cpu {u['agent_cpu']:4.2f} s  [{runs(u['agent_runs'])}]  "
              "(computes the sha256 it reports)")
        print(f"     curl  {u['curl']:7.0f} MB/s  cpu {u['curl_cpu']:4.2f} s  [{runs(u['curl_runs'])}]")
        print(f"     ratio {u['ratio']:7.2f}  cpu {u['agent_cpu']:.2f} against {u['curl_cpu']:.2f} s per GiB  "
              f"(goal >= 0.8; best run against best run: {u['best_ratio']:.2f})")
        budget = u["curl_cpu"] + report["sha256_cpu"] + 0.3
        print(f"     cpu budget {budget:4.2f} s = curl {u['curl_cpu']:.2f} + sha256 {report['sha256_cpu']:.2f} + 0.3: "
              f"{'met' if u['agent_cpu'] <= budget else 'NOT met'}; ratio goal {'met' if u['ratio'] >= 0.8 else 'NOT met'}")
    if d is not None or u is not None:
        print("3. Agent memory (child process; VmHWM after a reset, and VmRSS sampled every 20 ms):")
        for name, r in (("download", d), ("upload", u)):
            if r is not None:
                print(f"     {name:8s} idle {r['idle_rss'] / MiB:6.1f} MiB, peak {r['peak_rss'] / MiB:6.1f} MiB, "
                      f"growth {r['rss_growth'] / MiB:5.1f} MiB (goal < 64)")
    if s is not None:
        print(f"4. {s['tasks']} tasks sharing a {options.shared_mib} MiB input: nginx sent {s['bytes']} bytes "
              f"in {s['requests']} request(s), expected {s['expected']} once: "
              f"{'EXACT' if s['exact'] else 'NOT EXACT'}")
        print(f"     all staged in {s['seconds']:.1f} s; {s['inodes']} inode(s) among the tasks' copies; "
              f"RSS growth {s['rss_growth'] / MiB:.1f} MiB")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        child(sys.argv[2:])
    else:
        sys.exit(main())
