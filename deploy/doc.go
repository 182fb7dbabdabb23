// Package deploy holds PegaFlow's operator kit: the Grafana dashboard
// (grafana/), Prometheus scrape config and alert rules (prometheus/),
// systemd units (systemd/) and the demo stack script they are shown with
// (demo-stack.sh). It has no code: its tests check those files, offline
// (dashboard schema, rule and unit syntax) and against a real Prometheus
// scraping the demo stack (every panel returns data, the alerts fire when
// they should and only then). See docs/operations.md.
package deploy
