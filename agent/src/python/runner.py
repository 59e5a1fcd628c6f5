# The persistent interpreter of a sessiond session. The agent runs this with
# `python3 -I -u -c <this file>`; requests arrive on fd 3 and replies leave on
# fd 4, each a 4-byte big-endian length followed by UTF-8 JSON. stdout and
# stderr are never used for control, so user output cannot forge a reply.
#
# Only modules Python loads at startup anyway are imported here: an idle
# sandbox's memory matters, and matplotlib is only touched when the cell has
# imported it itself.
import ast
import json
import linecache
import os
import signal
import sys
import traceback

REQ_FD = 3
RESP_FD = 4
TRUNCATED = "\n[output truncated]\n"
# Figures returned per execution. The daemon reads at most 32 MiB of answer
# from the agent and keeps the streams and the result at 1 MiB each, so
# figures get at most 8 MiB of PNG (under 11 MiB as base64).
MAX_FIGURES = 8
MAX_FIGURE_BYTES = 4 << 20
MAX_FIGURES_TOTAL_BYTES = 8 << 20
RUNNER_FILE = sys._getframe().f_code.co_filename

os.set_inheritable(REQ_FD, False)
os.set_inheritable(RESP_FD, False)

try:
    with open("/proc/self/oom_score_adj", "w") as f:
        # The memory cgroup's OOM killer must pick the interpreter, never the agent.
        f.write("1000")
except OSError:
    pass

_in_cell = False


def _on_sigint(signum, frame):
    # A timeout's SIGINT that lands between cells must not kill the runner.
    if _in_cell:
        raise KeyboardInterrupt


def _read_exact(n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(REQ_FD, n - len(buf))
        if not chunk:
            sys.exit(0)
        buf += chunk
    return bytes(buf)


def _recv():
    n = int.from_bytes(_read_exact(4), "big")
    return json.loads(_read_exact(n))


def _send(obj):
    # "replace": a lone surrogate (from a surrogateescape-decoded name) must
    # not make the reply invalid UTF-8.
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "replace")
    data = len(data).to_bytes(4, "big") + data
    view = memoryview(data)
    while view:
        n = os.write(RESP_FD, view)
        view = view[n:]


class _CappedStream:
    """sys.stdout/sys.stderr during a cell: writes straight to the fd (so the
    order with subprocess output holds) and drops everything past the cap, so
    a print loop cannot fill the disk."""

    def __init__(self, fd, cap):
        self._fd = fd
        self._cap = cap
        self.written = 0
        self.dropped = False
        self.encoding = "utf-8"
        self.errors = "replace"

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        self.write_bytes(s.encode("utf-8", "replace"))
        return len(s)

    def write_bytes(self, data):
        """Binary writes (sys.stdout.buffer) count against the same cap."""
        data = bytes(data)
        if self.written >= self._cap:
            self.dropped = self.dropped or bool(data)
            return len(data)
        room = self._cap - self.written
        kept = data[:room]
        if len(data) > room:
            self.dropped = True
        view = memoryview(kept)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.written += len(kept)
        return len(data)

    @property
    def buffer(self):
        return _BinaryView(self)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass

    def fileno(self):
        return self._fd

    def isatty(self):
        return False

    def readable(self):
        return False

    def writable(self):
        return True

    def seekable(self):
        return False

    @property
    def closed(self):
        return False


class _BinaryView:
    def __init__(self, stream):
        self._stream = stream

    def write(self, data):
        return self._stream.write_bytes(data)

    def flush(self):
        pass

    def fileno(self):
        return self._stream.fileno()


class _Capture:
    """Redirects fds 1 and 2 into memory files for one cell, so output of
    os.system and subprocesses is captured too."""

    def __init__(self):
        self.files = []
        for name in ("stdout", "stderr"):
            try:
                fd = os.memfd_create("sessiond-" + name, os.MFD_CLOEXEC)
            except (AttributeError, OSError):
                # No memfd (seccomp, old kernel): an unlinked temp file.
                import tempfile

                with tempfile.TemporaryFile() as f:
                    fd = os.dup(f.fileno())
                os.set_inheritable(fd, False)
            self.files.append(fd)
        self.saved = [os.dup(1), os.dup(2)]
        for fd in self.saved:
            os.set_inheritable(fd, False)

    def start(self, cap):
        for target, fd in zip((1, 2), self.files):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.dup2(fd, target)
        self.streams = [_CappedStream(1, cap), _CappedStream(2, cap)]
        sys.stdout, sys.stderr = self.streams

    def stop(self, cap):
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        out = []
        for fd, stream in zip(self.files, self.streams):
            size = os.fstat(fd).st_size
            data = os.pread(fd, min(size, cap), 0)
            text = data.decode("utf-8", "replace")
            if size > cap or stream.dropped:
                text += TRUNCATED
            out.append(text)
            os.ftruncate(fd, 0)
        return out


def _format_result(value):
    if value is None:
        return ""
    # numpy scalars (np.int64(6), np.float64(0.5), np.bool_) are numbers to
    # the user; their repr changed in numpy 2 and is not JSON.
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        try:
            value = value.item()
        except Exception:
            return repr(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        # Beyond 64 bits the agent's JSON parser would round the number.
        if -(2**63) <= value < 2**64:
            return value
        return repr(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return repr(value)
        return value
    if isinstance(value, str):
        return value
    return repr(value)


def _collect_figures():
    """The open figures as PNG images within the caps, and a note for each
    figure left out."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return [], []
    import base64
    import io

    images = []
    notes = []
    total = 0
    try:
        nums = list(plt.get_fignums())
        for i, num in enumerate(nums):
            if len(images) == MAX_FIGURES:
                notes.append(
                    "%d more figure(s) not returned: at most %d figures are returned per execution"
                    % (len(nums) - i, MAX_FIGURES)
                )
                break
            fig = plt.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            png = buf.getvalue()
            if len(png) > MAX_FIGURE_BYTES:
                notes.append(
                    "figure %s not returned: its PNG is %d bytes, over the limit of %d bytes per figure"
                    % (num, len(png), MAX_FIGURE_BYTES)
                )
                continue
            if total + len(png) > MAX_FIGURES_TOTAL_BYTES:
                notes.append(
                    "figure %s not returned: the figures of one execution may total %d bytes of PNG"
                    % (num, MAX_FIGURES_TOTAL_BYTES)
                )
                continue
            total += len(png)
            images.append(
                {
                    "type": "image",
                    "format": "png",
                    "base64_data": base64.b64encode(png).decode("ascii"),
                }
            )
    finally:
        plt.close("all")
    return images, notes


def _format_exception(exc):
    if isinstance(exc, SyntaxError) and str(exc.filename).startswith("<cell-"):
        return "".join(traceback.format_exception_only(type(exc), exc))
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    # The runner's own frames (the cell's caller, the SIGINT handler) are noise.
    te.stack = traceback.StackSummary.from_list(
        [f for f in te.stack if f.filename != RUNNER_FILE]
    )
    return "".join(te.format())


def _reseed():
    random = sys.modules.get("random")
    if random is not None:
        random.seed()
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        try:
            np_random.seed()
        except Exception:
            pass


def _run_cell(code, namespace, counter):
    filename = "<cell-%d>" % counter
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    tree = ast.parse(code, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, filename, "exec"), namespace)
    if last is not None:
        return eval(compile(last, filename, "eval"), namespace)
    return None


def main():
    global _in_cell
    import warnings

    # plt.show() on the Agg backend only warns that it cannot show anything.
    warnings.filterwarnings("ignore", message=".*non-interactive.*", category=UserWarning)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    capture = _Capture()
    signal.signal(signal.SIGINT, _on_sigint)
    runner_pid = os.getpid()
    _send({"ready": True, "pid": runner_pid})
    counter = 0
    while True:
        req = _recv()
        counter += 1
        cap = int(req.get("max_output", 1 << 20))
        for key, value in req.get("env", []):
            os.environ[key] = value
        if req.get("reseed"):
            _reseed()
        status = "Success"
        result = ""
        display = []
        notes = []
        error = None
        capture.start(cap)
        try:
            _in_cell = True
            value = _run_cell(req["code"], namespace, counter)
            _in_cell = False
            result = _format_result(value)
            if isinstance(result, str) and len(result) > cap:
                # The reply must fit what the daemon reads from the agent.
                result = result[:cap]
                notes.append(
                    "the result was truncated to its first %d characters" % cap
                )
        except BaseException as exc:  # noqa: B036 - SystemExit and KeyboardInterrupt too
            _in_cell = False
            status = "Failure"
            error = _format_exception(exc)
            result = ""
        finally:
            _in_cell = False
            # User code may have replaced the handler (e.g. ignoring SIGINT).
            signal.signal(signal.SIGINT, _on_sigint)
        if os.getpid() != runner_pid:
            # A process the cell forked that fell through to here must not
            # answer in the runner's name or read its next request.
            os._exit(0)
        try:
            figures, figure_notes = _collect_figures()
            notes.extend(figure_notes)
        except BaseException as exc:  # noqa: B036
            figures = []
            error = (error or "") + "error while saving figures:\n" + _format_exception(exc)
        if figures:
            if result == "":
                result = figures.pop(0)
            display = figures
        stdout, stderr = capture.stop(cap)
        if error is not None:
            stderr += error
        for note in notes:
            if stderr and not stderr.endswith("\n"):
                stderr += "\n"
            stderr += "[sessiond] " + note + "\n"
        _send(
            {
                "status": status,
                "stdout": stdout,
                "stderr": stderr,
                "result": result,
                "display": display,
            }
        )


main()
