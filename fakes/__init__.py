"""Stand-ins for the REST APIs kbsync reads (Confluence, GitLab, Jira), served by
``pytest_httpserver`` on localhost.

Shared by the tests (``tests/``) and the benchmarks (``benchmarks/*.py``), so both
drive the real connectors against the same HTTP shapes. Not part of the wheel (only
``connectors``, ``transforms`` and ``flows`` are packaged); needs the ``dev`` extra.
"""
