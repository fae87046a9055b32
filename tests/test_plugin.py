"""Tests that Twisted's plugin system finds ``twistd popserv``."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject


def _popserv_makers():
    return [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "popserv"]


class PluginTests(SynchronousTestCase):
    def test_one_plugin(self):
        """Exactly one service maker is called popserv, and it provides IServiceMaker."""
        makers = _popserv_makers()
        self.assertEqual(len(makers), 1)
        self.assertTrue(verifyObject(IServiceMaker, makers[0]))
        self.assertTrue(verifyObject(IPlugin, makers[0]))

    def test_points_at_tap(self):
        """The plugin's options and makeService are those of popserv.tap."""
        from popserv import tap

        [maker] = _popserv_makers()
        self.assertIs(maker.options, tap.Options)
        self.assertIs(maker.makeService, tap.makeService)
        self.assertIn("POP3", maker.description)

    def test_other_plugins_still_found(self):
        """popserv's plugin directory does not hide Twisted's own plugins."""
        tapnames = {maker.tapname for maker in getPlugins(IServiceMaker)}
        self.assertTrue({"web", "mail", "popserv"} <= tapnames, tapnames)
