"""Index advisor: candidate indexes from captured slow plans, validated with HypoPG, and reports.

Entry points: `proxy.advisor.report.build_report` (the report as a dict) and
`proxy.advisor.cli.register` (the `pgfront advisor report` subcommand).
"""
