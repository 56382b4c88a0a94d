"""The key layout: every companion key shares its value key's Cluster slot."""

from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from django_apee.core import keys

key_text = st.text(alphabet=st.sampled_from("ab:{}|*1"), max_size=12) | st.text(
    max_size=40
)


@given(key_text, st.sampled_from([keys.LEASE, keys.WAKE]))
def test_companion_shares_the_slot_whenever_it_says_so(value_key, kind):
    companion = keys.companion(value_key, kind)
    assert companion != value_key
    if keys.same_slot(value_key):
        assert key_slot(companion.encode()) == key_slot(value_key.encode())


@given(key_text)
def test_companions_are_distinct_and_never_listed_by_django_redis_patterns(value_key):
    lease = keys.companion(value_key, keys.LEASE)
    wake = keys.companion(value_key, keys.WAKE)
    assert lease != wake
    assert lease.startswith(("{", "apee:"))


def test_layout_examples():
    assert keys.companion(":1:report", "lease") == "{:1:report}|apee:lease"
    assert (
        keys.companion(":1:{user42}:x", "lease") == "{user42}|apee:lease|:1:{user42}:x"
    )
    assert keys.companion(":1:a}b", "lease") == "apee:lease|:1:a}b"
    assert not keys.same_slot(":1:a}b")


def test_hash_tag_follows_redis_rules():
    assert keys.hash_tag("a{b}c") == "b"
    assert keys.hash_tag("a{}b{c}") is None  # empty first tag: whole key hashed
    assert keys.hash_tag("{a{b}") == "a{b"
    assert keys.hash_tag("a{b") is None


@given(key_text, st.sampled_from([keys.LEASE, keys.WAKE]))
def test_owner_inverts_companion(value_key, kind):
    assert keys.owner(keys.companion(value_key, kind), kind) == value_key


@given(key_text)
def test_a_value_key_owns_nothing(value_key):
    if keys.owner(value_key, keys.LEASE) is not None:
        assert value_key.startswith(("{", "apee:"))  # it is a companion's name


def test_companion_patterns_name_each_form():
    import fnmatch

    patterns = keys.companion_patterns(":1:inv:*", keys.LEASE)
    for value_key in (":1:inv:a", ":1:inv:{t}b", ":1:inv:b}c"):
        lease = keys.companion(value_key, keys.LEASE)
        assert any(fnmatch.fnmatchcase(lease, p) for p in patterns), lease
    other = keys.companion(":1:other", keys.LEASE)
    assert not any(fnmatch.fnmatchcase(other, p) for p in patterns)
