"""Tests that popserv installs as a Twisted plugin: the wheel's contents and twistd's view of it."""

import os
import shutil
import sys
import zipfile

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Build products and local state that must not leak into the copy the wheel is built from.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "_trial_temp*",
    "__pycache__",
    "dropin.cache",
    "popserv-data",
    ".hypothesis",
)

_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def run_python(*args: str, path: str = REPO):
    """Run this Python with ``args`` in ``path``; fires with (stdout, stderr, exit code) as str."""
    d = getProcessOutputAndValue(sys.executable, args, env=dict(os.environ), path=path)
    return d.addCallback(
        lambda result: (result[0].decode(), result[1].decode(), result[2]),
    )


class WheelTests(TestCase):
    """The built wheel ships the plugin file, and nothing that shadows Twisted."""

    timeout = 300

    @defer.inlineCallbacks
    def test_wheel_contents(self):
        """The wheel has twisted/plugins/popserv_plugin.py, no twisted/**/__init__.py, no tests."""
        work = os.path.abspath(self.mktemp())
        source = os.path.join(work, "src")
        shutil.copytree(REPO, source, ignore=_NOT_SOURCES)
        out, err, code = yield run_python(
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            os.path.join(work, "wheels"),
            source,
            path=source,
        )
        self.assertEqual(code, 0, out + err)
        [wheel] = os.listdir(os.path.join(work, "wheels"))
        with zipfile.ZipFile(os.path.join(work, "wheels", wheel)) as archive:
            names = archive.namelist()
            entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
            scripts = archive.read(entry_points).decode()

        self.assertIn("twisted/plugins/popserv_plugin.py", names)
        self.assertIn("popserv/tap.py", names)
        # Every module of the package, subpackages included (setup.cfg lists them by hand).
        modules = [
            os.path.relpath(os.path.join(folder, name), REPO)
            for folder, _, files in os.walk(os.path.join(REPO, "popserv"))
            for name in files
            if name.endswith(".py")
        ]
        self.assertEqual(sorted(set(modules) - set(names)), [])
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertEqual(
            [n for n in names if n.startswith("twisted/")], ["twisted/plugins/popserv_plugin.py"]
        )
        self.assertEqual([n for n in names if n.startswith("tests/")], [])
        self.assertEqual([n for n in names if n.endswith("dropin.cache")], [])
        self.assertIn("popserv = popserv.admin:main", scripts)


class TwistdTests(TestCase):
    """twistd, run as an admin would, knows popserv and its options."""

    timeout = 60

    @defer.inlineCallbacks
    def test_twistd_lists_popserv(self):
        """``twistd --help`` lists the popserv command with its description."""
        out, err, code = yield run_python("-c", _TWISTD, "--help")
        self.assertEqual(code, 0, err)
        [line] = [line for line in out.splitlines() if line.split()[:1] == ["popserv"]]
        self.assertIn("POP3", line)

    @defer.inlineCallbacks
    def test_popserv_help(self):
        """``twistd -n popserv --help`` documents every option."""
        out, err, code = yield run_python("-c", _TWISTD, "-n", "popserv", "--help")
        self.assertEqual(code, 0, err)
        for option in ("--config=", "--pop3=", "--mailroot=", "--users=", "--hostname="):
            self.assertIn(option, out)

    @defer.inlineCallbacks
    def test_usage_error(self):
        """A bad listener stops twistd before it starts, with the reason on the terminal."""
        out, err, code = yield run_python("-c", _TWISTD, "-n", "popserv", "--pop3", "nosuch:110")
        self.assertNotEqual(code, 0)
        self.assertIn("invalid POP3 listener 'nosuch:110'", out + err)
