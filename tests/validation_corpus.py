"""A small team handbook for validation tests: 20 pages on distinct topics, each with
specific facts (names, numbers), so a question written from one page is answered by
that page and not by the others. Written for these tests.
"""

from __future__ import annotations

HANDBOOK: dict[str, str] = {
    "backups.md": """# Database backups

Nightly backups of the billing database run at 02:00 UTC with pgBackRest and are kept
for 35 days in the eu-west-backups bucket. Each backup is encrypted with the key held by
the platform team. Restores are rehearsed every quarter by the SRE team: a restore that
takes longer than four hours is treated as an incident. Point-in-time recovery is
possible for the last seven days because write-ahead logs are archived every minute.
""",
    "oncall.md": """# On-call rotation

The on-call rotation changes every Monday at 10:00 local time, and the outgoing engineer
hands over open alerts in the #oncall-handover channel. Pages come from PagerDuty; an
unacknowledged page escalates to the secondary after 15 minutes and to the engineering
manager after 30 minutes. On-call engineers get one day off after a week with more than
three night pages.
""",
    "vpn.md": """# VPN access

Remote access to internal systems goes through the WireGuard VPN. Download your personal
configuration from the self-service portal at vpn.northwind.internal after signing in with
single sign-on and a hardware security key. The VPN listens on UDP port 51820. Split
tunnelling is enabled: only the 10.20.0.0/16 network is routed through the tunnel.
Configurations expire after 180 days and must be downloaded again.
""",
    "release.md": """# Release train

Northwind ships a release train every second Tuesday. The code freeze starts on the
Friday before at 16:00, when the release branch is cut from main. The release manager of
the cycle, chosen from the rota in the release calendar, runs the smoke tests on staging
and signs off the deployment. Hotfixes skip the train but need approval from two senior
engineers.
""",
    "incidents.md": """# Incident severity levels

SEV1 means customers cannot pay or log in; SEV2 means a major feature is degraded for many
customers; SEV3 is a minor degradation with a workaround; SEV4 is cosmetic. A SEV1 or SEV2
needs an incident commander and status page updates every 30 minutes. A blameless
postmortem is written within five business days of every SEV1 and SEV2 incident and
reviewed in the Thursday reliability meeting.
""",
    "code_review.md": """# Code review rules

Every merge request needs two approvals, one of them from a code owner listed in the
CODEOWNERS file of the repository. Authors never merge their own change without review.
Reviewers answer within one working day; a merge request that waited longer can be raised
in the team's daily stand-up. Changes above 400 lines should be split into smaller merge
requests.
""",
    "expenses.md": """# Expense policy

Business expenses are submitted in Spendly within 30 days of the purchase. Receipts are
required for every amount above 25 euros; the finance team rejects claims without them.
Travel must be booked through the travel desk, and train travel is preferred for trips
under six hours. Meals while travelling are reimbursed up to 60 euros a day.
""",
    "laptops.md": """# Laptop security

Company laptops must use full-disk encryption: FileVault on macOS and LUKS on Linux. The
screen locks after five minutes of inactivity. A lost or stolen laptop is reported to the
IT helpdesk within one hour, so the device can be wiped remotely through the mobile device
management system. Personal software is allowed only from the approved catalogue.
""",
    "migrations.md": """# Database migrations

Schema migrations are written with Alembic and must be backward compatible with the
previous release, because old and new application versions run side by side during a
deployment. Use the expand and contract pattern: add the new column first, backfill it in
a background job, switch reads, and drop the old column only one release later. Migrations
that lock a table for more than two seconds need a review from the database team.
""",
    "feature_flags.md": """# Feature flags

Feature flags are managed in Unleash. Every flag has an owner and an expiry date; flags are
removed from the code no later than 90 days after the feature reached 100 percent of
users. Gradual rollouts start at 5 percent of traffic in the Netherlands before other
countries. Flags must never be used to hide unfinished security fixes.
""",
    "logging.md": """# Log retention

Application logs are shipped with Promtail to Loki, where they stay searchable for 14 days.
After that they are archived to S3 Glacier and kept for one year for audit purposes. Logs
must not contain card numbers, passwords or access tokens; the log scrubber masks values
that look like them. Debug logging in production is allowed for at most 24 hours.
""",
    "access.md": """# Access requests

Access to production systems is requested through the ServiceNow access form. The
requester's manager approves the request and the system owner grants it. Production access
is reviewed every six months, and all access is revoked automatically on the last working
day of an employee who leaves. Emergency break-glass accounts are logged and audited the
next morning.
""",
    "rate_limits.md": """# Public API rate limits

The public REST API allows 600 requests per minute per access token. Above the limit the
API answers with HTTP 429 and a Retry-After header that says how many seconds to wait.
Partners on the enterprise plan can ask for a limit of 3000 requests per minute. Bulk
exports should use the asynchronous export endpoint instead of paging through the API.
""",
    "tls.md": """# TLS certificates

Certificates for public domains are issued by Let's Encrypt through cert-manager running in
the Kubernetes clusters. cert-manager renews a certificate 30 days before it expires. An
alert fires in Grafana when any certificate has less than 14 days left, which usually means
the DNS challenge failed. Internal services use certificates from the company's private
certificate authority.
""",
    "kafka.md": """# Kafka topics

Kafka topic names follow the pattern domain.entity.event.v1, for example
payments.invoice.created.v1. New topics get seven partitions and a retention of three days
unless the owning team asks for more. Topics are created through the platform's Terraform
module, never by hand, and every topic has a schema registered in the schema registry with
backward compatibility.
""",
    "onboarding.md": """# Onboarding

Every new hire gets an onboarding buddy from their own team for the first three months.
IT creates the accounts on the Tuesday before the start date, and the laptop is shipped to
the new colleague's home address. The first week follows a checklist: development
environment setup, a first small merge request, and meetings with the product manager and
the team lead.
""",
    "holidays.md": """# Vacation

Employees have 28 vacation days a year. Vacation is requested in Personio at least two
weeks ahead for absences longer than three days. Up to five unused days can be carried over
into the next year, and they must be taken before March 31. Public holidays follow the
office the employee is contracted with.
""",
    "dashboards.md": """# Service level objectives

The checkout service has an availability objective of 99.9 percent over 30 days, measured
from the load balancer's successful responses. The Grafana dashboard "Checkout SLO" shows
the remaining error budget. When more than half of the monthly error budget is burnt, the
team pauses feature work and spends the next sprint on reliability.
""",
    "secrets.md": """# Secrets management

Secrets such as database passwords and API keys live in HashiCorp Vault and are injected
into services at start-up. Secrets are rotated every 90 days, and immediately when someone
who knew them leaves. Secrets never go into git: the gitleaks pre-commit hook and a CI job
block commits that contain them.
""",
    "search.md": """# Internal search service

The internal search service is built on OpenSearch. The product catalogue is reindexed every
night at 03:30 UTC, and price changes are streamed in near real time from Kafka. Synonyms
are maintained in the synonyms.txt file of the search repository and deployed with the
next reindex. Queries slower than 500 milliseconds are logged for the search team.
""",
}

#: Hand-written questions with the page that answers them (document ids of source
#: ``handbook``).
GOLDEN = [
    {"question": "How many days are billing database backups kept?",
     "expected": "handbook:backups.md", "reference": "35 days, in the eu-west-backups bucket."},
    {"question": "Which UDP port does the WireGuard VPN use?", "expected": "handbook:vpn.md",
     "reference": "UDP port 51820."},
    {"question": "How many requests per minute does the public API allow per token?",
     "expected": "handbook:rate_limits.md", "reference": "600 requests per minute."},
    {"question": "How long are application logs searchable in Loki?",
     "expected": "handbook:logging.md", "reference": "14 days."},
    {"question": "When does cert-manager renew a TLS certificate?",
     "expected": "handbook:tls.md", "reference": "30 days before it expires."},
    {"question": "How many partitions does a new Kafka topic get?",
     "expected": "handbook:kafka.md", "reference": "Seven partitions."},
]
