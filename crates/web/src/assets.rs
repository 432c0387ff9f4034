//! Static files: nook's own script and style, and xterm.js from npm (see build.rs), all
//! embedded in the binary so a running nook needs nothing on disk.

use hyper::{Response, StatusCode, header};

use crate::{WebBody, full, text};

macro_rules! vendor {
    ($path:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/vendor/node_modules/",
            $path
        ))
    };
}

macro_rules! own {
    ($path:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/", $path))
    };
}

const FILES: &[(&str, &str, &[u8])] = &[
    ("app.js", "text/javascript", own!("app.js")),
    ("term.js", "text/javascript", own!("term.js")),
    ("agent.js", "text/javascript", own!("agent.js")),
    ("app.css", "text/css", own!("app.css")),
    ("favicon.svg", "image/svg+xml", own!("favicon.svg")),
    (
        "xterm.js",
        "text/javascript",
        vendor!("@xterm/xterm/lib/xterm.js"),
    ),
    (
        "xterm.css",
        "text/css",
        vendor!("@xterm/xterm/css/xterm.css"),
    ),
    (
        "addon-fit.js",
        "text/javascript",
        vendor!("@xterm/addon-fit/lib/addon-fit.js"),
    ),
];

pub(crate) fn serve(name: &str) -> Response<WebBody> {
    let Some((_, content_type, bytes)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return text(StatusCode::NOT_FOUND, "No such file");
    };
    let mut resp = full(StatusCode::OK, content_type, *bytes);
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("public, max-age=300"),
    );
    resp
}
