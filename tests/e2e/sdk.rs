//! The Python SDK (`sdk/python`) end to end: through the remote API over TLS, one VM of the
//! busybox test image runs an agent whose output is streamed and whose exit code comes back,
//! files go in and out of it byte for byte while it runs and off its disk once it has ended,
//! and the real VMM pauses and resumes it (`sdk/python/tests/test_guest.py`).

use nanoclaw_tests::oci::import_test_image;
use nanoclaw_tests::peers::mcp_python;
use nanoclaw_tests::sdk::{RemoteApi, assert_sdk_tests_passed, sdk_tests};
use nanoclaw_tests::{Daemon, GuestImage, OutputWithin, RUN_TIMEOUT, free_port};

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn the_python_sdk_runs_an_agent_and_copies_its_files() {
    let guest = GuestImage::from_env().expect("guest image");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&guest.vmlinux, &guest.initramfs, &["--listen", &listen])
        .expect("start the daemon");
    import_test_image(&d, "sdk-test", RUN_TIMEOUT).expect("import the test image");
    let api = RemoteApi::of(&d, port);
    let out = sdk_tests(
        &mcp_python(),
        &api,
        "guest",
        &["test_guest"],
        &[("NANOCLAW_TEST_IMAGE", "sdk-test")],
    )
    .output_within(RUN_TIMEOUT)
    .unwrap_or_else(|e| panic!("the SDK's tests: {e:#}\n{}", d.records()));
    assert_sdk_tests_passed(&out, 1, &d.records());
}
