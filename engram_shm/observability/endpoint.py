"""The server's /metrics endpoint: prometheus-client's HTTP server in a
thread of the server process, over a registry holding the engine's collector
alone (no process or platform collectors: the engine's processes are many,
and the collector reports them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

from ..config import metrics_address
from ..errors import InvalidArgument


class MetricsEndpoint:
    def __init__(self, collector: Collector, address: str):
        """Serve `collector` at http://address/metrics (HOST:PORT; port 0
        picks a free one: see `url`)."""
        host, port = metrics_address(address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        try:
            self._httpd, self._thread = start_http_server(port, host, registry)
        except OSError as e:
            raise InvalidArgument(f"cannot serve metrics on {address}: {e.strerror}; pick another "
                                  "--metrics HOST:PORT, or --metrics off", field="metrics") from None
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self._httpd.server_address[1]}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
