"""The control plane: the only writer of switch state, and what acts on the data plane's reports.

Vocabulary:

- **controller**: applies flips and weight changes: validate (core), persist, install the new route
  table, then start or cancel drains (`controller`).
- **state backend**: where the switch state survives a restart; a file by default (`state`).
- **drainer**: carries out drains and the shutdown drain: closes what is left at the deadline (`drain`).
- **health monitor**: active probes and passive ejection, deciding with core.health and reporting
  the verdict to the pools the data plane reads (`health`).
- **configure**: turns the validated config into the data plane's frozen settings and pools.

Nothing here parses a byte of proxied traffic; nothing in the data plane changes switch state.
"""
