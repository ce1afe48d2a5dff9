//! Deciding whether a privileged test runs. As root it runs. Otherwise it
//! is skipped with a printed reason, unless `PBUS_REQUIRE_PRIVILEGED=1`
//! (CI, which runs as root) demands that it run, in which case it fails
//! loudly instead of passing silently. The same goes for a privileged test
//! that finds the machine lacking something it needs ([`skip`]).

/// Environment variable that turns a privileged test's skip into a failure.
pub const REQUIRE_PRIVILEGED_ENV: &str = "PBUS_REQUIRE_PRIVILEGED";

/// True if the calling test may do what needs root (`what` says what, for
/// the skip message). Not root: panics if `PBUS_REQUIRE_PRIVILEGED=1`,
/// otherwise prints why the test is skipped and returns false.
pub fn require_root(what: &str) -> bool {
    if pbus_sys::process::effective_uid() == 0 {
        return true;
    }
    skip(&format!("{what} needs root"));
    false
}

/// Skips the calling privileged test (the caller then returns) for
/// `reason`, printed. Panics instead if `PBUS_REQUIRE_PRIVILEGED=1`
/// forbids skipping.
pub fn skip(reason: &str) {
    if std::env::var(REQUIRE_PRIVILEGED_ENV).is_ok_and(|v| v == "1") {
        panic!("{reason}, and {REQUIRE_PRIVILEGED_ENV}=1 forbids skipping");
    }
    eprintln!("skipped: {reason} (set {REQUIRE_PRIVILEGED_ENV}=1 to make this a failure)");
}
