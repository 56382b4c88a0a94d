"""Django's cache tests against ApeeCache on a 6-node Redis Cluster.

The cluster (3 primaries, 3 replicas; ``APEE_SERVER_BIN=valkey`` makes it
Valkey) is started when these settings are read and stopped at exit; the
single server of ``tests.settings`` keeps running beside it for the suite's
own fixtures. Run::

    pytest -p no:cacheprovider --ds=tests.conformance.cluster_settings \
        tests/conformance/suite.py tests/conformance/async_suite.py

(the async suite: the native async engine on the cluster, a loop per call).
"""

from tests.conformance.settings import *  # noqa: F403
from tests.support.cluster import session_cluster_urls

APEE_CONFORMANCE_LOCATION = session_cluster_urls()
APEE_CONFORMANCE_OPTIONS = {"CLIENT_CLASS": "django_apee.cluster.ApeeClusterClient"}
#: The near cache is refused on a cluster (apee.E010): its class is skipped.
APEE_CONFORMANCE_NEAR = False
