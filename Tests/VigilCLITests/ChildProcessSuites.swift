import Testing

/// The suites that wait on child processes (the binary, iptables, servers inside network namespaces) and sleep between
/// polls hold a thread of Swift's cooperative pool while they do. That pool has a thread per core: on a two-core
/// machine two of them at once leave none for every other async test, whose proxies' timers (header and idle
/// timeouts) then fire while the test that owns them cannot run. Nested under this serialized suite, they run one at
/// a time.
@Suite(.serialized) enum ChildProcessSuites {}
