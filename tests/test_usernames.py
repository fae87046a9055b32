"""Tests for popserv.usernames: where a name's Maildir is, and which names collide."""

from __future__ import annotations

import os

from twisted.trial import unittest

from popserv.maildir import MaildirStore
from popserv.usernames import Collision, collision_key, find_collisions, user_parts


class UserPartsTests(unittest.TestCase):
    def test_is_the_store_mapping(self):
        """path_for joins the mail root and user_parts: one mapping for both."""
        store = MaildirStore("/srv/mail")
        for user in ["alice", "Alice@Example.ORG", "new@example.org", "example.org"]:
            self.assertEqual(store.path_for(user), os.path.join("/srv/mail", *user_parts(user)))

    def test_path_like_names_are_refused(self):
        """'.', '..', dot-led parts, '/', controls, empty parts and two '@' have no Maildir."""
        for user in [".", "..", ".x", "a/b", "cur/new", "a\0", "a@b@c", "@x", "x@", "x@.."]:
            self.assertRaises(ValueError, user_parts, user)

    def test_maildir_words_are_plain_names(self):
        """cur, new and tmp are ordinary names: a Maildir of their own under the root."""
        for user in ["cur", "new", "tmp"]:
            self.assertEqual(user_parts(user), (user,))
        self.assertEqual(user_parts("new@example.org"), ("example.org", "new"))


class CollisionTests(unittest.TestCase):
    def test_case_variants_of_a_domain_collide(self):
        """alice@EXAMPLE.ORG and alice@example.org have one Maildir: they collide."""
        self.assertEqual(
            find_collisions(["alice@EXAMPLE.ORG", "alice@example.org"]),
            [Collision("alice@example.org", "alice@EXAMPLE.ORG", False)],
        )

    def test_case_variants_of_a_local_part_collide(self):
        """Alice and alice collide, bare or at a domain: local parts are compared without case."""
        self.assertEqual(find_collisions(["Alice", "alice"]), [Collision("alice", "Alice", False)])
        self.assertEqual(
            find_collisions(["ALICE@example.org", "alice@example.org"]),
            [Collision("alice@example.org", "ALICE@example.org", False)],
        )

    def test_unicode_forms_collide(self):
        """Case folding and compatibility forms are folded: Straße/STRASSE, fullwidth letters."""
        self.assertEqual(len(find_collisions(["Straße", "STRASSE"])), 1)
        self.assertEqual(len(find_collisions(["\uff42\uff4f\uff42", "bob"])), 1)
        self.assertEqual(collision_key("e\u0301@x"), collision_key("\u00e9@x"))

    def test_trailing_dot_collides(self):
        """alice@example.org. is alice@example.org, as in DNS."""
        self.assertEqual(len(find_collisions(["alice@example.org.", "alice@example.org"])), 1)

    def test_user_named_as_a_domain_nests(self):
        """The user example.org holds new@example.org's Maildir (its new/): they collide."""
        self.assertEqual(
            find_collisions(["example.org", "new@example.org"]),
            [Collision("new@example.org", "example.org", True)],
        )
        self.assertEqual(
            find_collisions(["bob@Example.ORG", "EXAMPLE.org"]),
            [Collision("bob@Example.ORG", "EXAMPLE.org", True)],
        )

    def test_every_pair_is_found(self):
        """Three spellings of one Maildir make three pairs; a nest counts each inner name."""
        found = find_collisions(["a@x", "A@x", "a@X", "x", "b@x", "carol"])
        self.assertEqual(len([c for c in found if not c.nested]), 3)
        self.assertEqual(
            sorted(c.user for c in found if c.nested), sorted(["a@x", "A@x", "a@X", "b@x"])
        )
        self.assertTrue(all(c.other == "x" for c in found if c.nested))

    def test_distinct_names_do_not_collide(self):
        """Different users, a domain and a bare name of the same local part, do not collide."""
        names = ["alice", "alice@example.org", "bob@example.org", "example.com", "new", "cur"]
        self.assertEqual(find_collisions(names), [])

    def test_repeated_and_unmappable_names_are_ignored(self):
        """A name given twice is one user; names with no Maildir collide with nothing."""
        self.assertEqual(find_collisions(["alice", "alice", "../alice", ".alice", b"alice"]), [])
