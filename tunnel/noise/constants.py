"""Protocol constants (wireguard-go device/constants.go, the WireGuard whitepaper)."""

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# Message types (one byte, then three reserved zero bytes).
MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_MIN_SIZE = 32  # header + tag: a keepalive

# Limits and timers, in messages and seconds.
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 0.334
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 0.020  # flood: initiations closer than this are dropped
# Retries after which the initiator gives up (wireguard-go: MaxTimerHandshakes).
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
# An initiator rekeys on receive when its keypair is this old, so it never hits REJECT_AFTER_TIME.
REKEY_ON_RECEIVE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
ZERO_KEYS_AFTER = REJECT_AFTER_TIME * 3

# Packets held per peer while a handshake is pending (wireguard-go QueueStagedSize).
STAGED_QUEUE_SIZE = 128
DEFAULT_MTU = 1420

# Under-load detection. wireguard-go is under load when its handshake queue (1024) is 1/8 full and
# stays so for a second; without a queue we count handshake messages arriving per second. Only
# messages of the right size with a valid mac1 count (wireguard-go takes the decision only for a
# valid-mac1 message, and its workers drain junk from the queue at one BLAKE2s each): junk typed
# 1 or 2 never puts us under load.
HANDSHAKE_LOAD_THRESHOLD = 128
UNDER_LOAD_AFTER_TIME = 1.0
# Handshake work per received batch. wireguard-go hands handshake messages to worker goroutines
# through a bounded queue (1024, dropping when full) so transport data never waits for them;
# one thread here does both, so a batch (at most 128 datagrams, wireguard-go's IdealBatchSize)
# gives at most 1/8 of itself (wireguard-go's load fraction of its queue) to valid-mac1 handshake
# messages: the first 16 go on (cookie reply, rate limiter, Noise), the rest are dropped and
# counted. mac1 is still checked for every one, so junk cannot use up the budget.
HANDSHAKES_PER_BATCH = 16
# Per-source handshake rate limit (wireguard-go ratelimiter/).
RATELIMIT_PACKETS_PER_SECOND = 20
RATELIMIT_BURST = 5
RATELIMIT_MAX_ENTRIES = 65536
