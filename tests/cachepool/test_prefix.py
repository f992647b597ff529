import struct
import subprocess
import sys

import pytest

from prfaas.kv.prefix import ROOT_HASH, block_hashes, chain_hash


def test_only_full_blocks_are_hashed() -> None:
    assert block_hashes([], 4) == []
    assert block_hashes([1, 2, 3], 4) == []
    assert len(block_hashes(list(range(11)), 4)) == 2


def test_hash_is_chained_over_the_whole_prefix() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[1] != b[1]                          # same second block, different prefix
    assert a == block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 99], 4)
    assert a[1] == chain_hash(chain_hash(ROOT_HASH, [1, 2, 3, 4]), [5, 6, 7, 8])
    assert block_hashes([5, 6, 7, 8], 4, parent=a[0]) == [a[1]]
    assert all(0 <= h < 2**64 for h in a)


def test_hash_is_stable_across_processes() -> None:
    code = "from prfaas.kv.prefix import block_hashes; print(block_hashes(list(range(32)), 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(block_hashes(list(range(32)), 16))


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        block_hashes([1], 0)
    with pytest.raises(struct.error):
        block_hashes([2**31], 1)
