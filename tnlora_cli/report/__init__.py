"""Reporting: the `Reporter` through which the library says progress (it never prints),
plain progress lines for logs, and PNG figures."""
