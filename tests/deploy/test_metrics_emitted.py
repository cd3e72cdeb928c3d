"""Every metric that deploy/ (dashboard, alert rules, autoscalers) uses is emitted by the server.

Needs a running server: the `live_server_url` fixture (base URL such as http://127.0.0.1:8000) is
provided by the e2e setup, not here. Metric families appear in `# TYPE` lines even before they
have samples, so a freshly started server is enough.
"""

import urllib.request

import pytest
from metric_refs import exposed_metric_families, referenced_metrics

pytestmark = pytest.mark.e2e


def test_every_referenced_metric_is_emitted(live_server_url):
    url = live_server_url.rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    exposed = exposed_metric_families(text)
    missing = {name: places for name, places in referenced_metrics().items() if name not in exposed}
    assert not missing, "metrics used in deploy/ but not emitted by the server:\n" + "\n".join(
        f"  {name}: {', '.join(places[:3])}" for name, places in missing.items())
