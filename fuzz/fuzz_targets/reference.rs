//! Image references from users and servers: no panic; a parsed reference prints to a string that
//! parses back to the same reference.
#![no_main]
use cw::image::reference::Reference;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Reference::parse(s) {
        let again = Reference::parse(&r.to_string()).expect("a printed reference parses");
        assert_eq!(r, again);
        let _ = r.familiar();
    }
    let _ = cw::image::manifest::Platform::parse(s);
});
