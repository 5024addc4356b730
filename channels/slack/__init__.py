"""The Slack channel (slack-bolt ``AsyncApp``) and the agents' Slack workspace.

Needs the ``slack`` extra (``pip install helpline[slack]``). The entry point
is :func:`channels.slack.plugin.make`; see :mod:`channels.slack.channel` for
the request path and :mod:`channels.slack.workspace` for the agents' side.
"""
