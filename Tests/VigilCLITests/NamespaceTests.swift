import Testing

/// The tests that run inside network namespaces wait on child processes and sleep between polls, holding a thread of
/// Swift's cooperative pool while they do. That pool has a thread per core: on a two-core machine two such tests at
/// once would leave none for every other async test, whose proxies' timers (header and idle timeouts) then fire
/// while the test that owns them cannot run. Nested under this serialized suite, they run one at a time.
@Suite(.serialized) enum NamespaceTests {}
