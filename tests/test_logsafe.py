"""Client-supplied text in log events stays one token on one line."""

import json

from twisted.trial.unittest import SynchronousTestCase

from popserv.logsafe import quoted, untrusted


class QuotedTests(SynchronousTestCase):
    def test_plain_names_stay_bare(self):
        """Ordinary user names, hosts and addresses are logged as they are."""
        for text in ("alice", "alice@example.org", "127.0.0.1", "bob+tag", "mail-1.example"):
            self.assertEqual(quoted(text), text)

    def test_line_ends_and_escapes_cannot_leave_the_token(self):
        """CR, LF, ESC, DEL, quotes and spaces are escaped inside one quoted token."""
        for text in (
            "alice\n2026-12-04T00:00:00+0000 [popserv.pop3#info] x",
            "a\rb",
            "\x1b[31mred",
            "x\x7fy",
            'say "hi"',
            "back\\slash",
            "line\u2028separator",
            "x from 192.0.2.99 (bad credentials)",
        ):
            token = quoted(text)
            self.assertTrue(token.startswith('"') and token.endswith('"'), token)
            self.assertTrue(token.isascii() and token.isprintable(), token)
            self.assertNotIn('"', token[1:-1].replace('\\"', ""))
            self.assertEqual(json.loads(token), text)

    def test_bytes_that_are_not_utf8(self):
        """Undecodable bytes show as escapes, never raw."""
        token = quoted(b"\xff\x1b[31m")
        self.assertEqual(token, '"\\udcff\\u001b[31m"')

    def test_none_and_empty(self):
        """A missing value is ``-``; an empty one is ``""``, so neither vanishes from the line."""
        self.assertEqual(quoted(None), "-")
        self.assertEqual(quoted(""), '""')


class UntrustedTests(SynchronousTestCase):
    def test_field_is_raw_and_text_is_quoted(self):
        """An event keeps the client's value in its field and shows it quoted in its text."""
        from twisted.logger import formatEvent

        name = "alice\n2026 [popserv.pop3#info] pop3.login_failed: 192.0.2.1"
        event = {"log_format": "x: peer={peer} user={user}", "peer": "127.0.0.1"}
        event["user"] = untrusted(name)
        self.assertEqual(event["user"], name)
        self.assertEqual(formatEvent(event), "x: peer=127.0.0.1 user=" + quoted(name))
        self.assertNotIn("\n", formatEvent(event))

    def test_bytes_and_none(self):
        """Bytes are decoded (undecodable ones escaped in the text); None stays None."""
        self.assertEqual(format(untrusted(b"\xffx")), '"\\udcffx"')
        self.assertIsNone(untrusted(None))
