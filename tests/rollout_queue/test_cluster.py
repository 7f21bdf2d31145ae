"""On the Redis Cluster run of the suite: the client really is cluster-aware, and each
experiment's keys share one slot (what the scorer's atomic publish relies on)."""
from __future__ import annotations

import pytest
import redis
from redis.exceptions import RedisClusterException, ResponseError

from opd_client.queue import dead_key, rollouts_key, scored_key
from opd_client.queue.connection import connect


@pytest.fixture
def cluster(redis_url, on_cluster):
    if not on_cluster:
        pytest.skip("single-node run of the suite")
    r = connect(redis_url)
    assert isinstance(r, redis.RedisCluster), f"connect({redis_url!r}) did not detect the cluster: {type(r)}"
    return r


def test_an_experiments_keys_share_a_slot_and_experiments_spread(cluster):
    slots = {e: {cluster.keyslot(k(e)) for k in (rollouts_key, scored_key, dead_key)} for e in "abcdefgh"}
    assert all(len(s) == 1 for s in slots.values())
    nodes = {cluster.get_node_from_key(rollouts_key(e)).name for e in "abcdefgh"}
    assert len(cluster.get_primaries()) == 3 and len(nodes) > 1


def test_without_the_shared_slot_one_transaction_would_be_refused(cluster):
    a, b = next((a, b) for a in "abcdefgh" for b in "abcdefgh"
                if cluster.keyslot(rollouts_key(a)) != cluster.keyslot(scored_key(b)))
    pipe = cluster.pipeline(transaction=True)
    pipe.xadd(rollouts_key(a), {"d": b"x"})
    pipe.xadd(scored_key(b), {"d": b"x"})
    with pytest.raises((RedisClusterException, ResponseError)):
        pipe.execute()
