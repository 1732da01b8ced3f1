//! SVG pictures rendered to pixels, so a check can tell a picture from a blank canvas: a
//! text model judging SVG source cannot see that every shape lies outside the viewBox or
//! is painted with nothing, and small models write such documents often.
//!
//! The document is a subagent's output, and an external pool's outputs are whatever its
//! server sends: the work a render may take is bounded before it starts.

use resvg::tiny_skia::{Pixmap, Transform};
use resvg::usvg::{Options, Tree};

/// The width pictures are checked at; small enough to render in milliseconds.
pub const CHECK_WIDTH: u32 = 160;

/// Least share of the canvas a picture must paint, in thousandths.
const MIN_PAINTED_PER_MILLE: usize = 20;

/// Least share of the painted pixels a second colour must cover, in thousandths, so the
/// anti-aliased edge of a flat background does not count as a drawing.
const MIN_SECOND_COLOUR_PER_MILLE: usize = 5;

/// Most elements and nesting a checked document may have; `<use>`, whose copies of copies
/// multiply, is not rendered at all.
const MAX_ELEMENTS: usize = 5000;
const MAX_DEPTH: usize = 32;

/// `svg` rendered to fit `width` by four times that in height, or why it cannot be.
pub fn render(svg: &str, width: u32) -> Result<Pixmap, String> {
    bounded(svg)?;
    let tree = Tree::from_str(svg, &Options::default())
        .map_err(|err| format!("the picture does not render: {err}"))?;
    let size = tree.size();
    let scale = (width as f32 / size.width()).min(4.0 * width as f32 / size.height());
    let (w, h) = (
        (size.width() * scale).ceil().max(1.0) as u32,
        (size.height() * scale).ceil().max(1.0) as u32,
    );
    let mut pixmap = Pixmap::new(w, h).ok_or_else(|| {
        format!(
            "the picture's size {}x{} cannot be drawn",
            size.width(),
            size.height()
        )
    })?;
    resvg::render(
        &tree,
        Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    Ok(pixmap)
}

/// Refuses a document whose render could take unbounded work.
fn bounded(svg: &str) -> Result<(), String> {
    let doc = roxmltree::Document::parse(svg)
        .map_err(|err| format!("the picture does not render: {err}"))?;
    let mut elements = 0;
    for node in doc.descendants().filter(|n| n.is_element()) {
        elements += 1;
        if elements > MAX_ELEMENTS {
            return Err(format!(
                "the picture has more than {MAX_ELEMENTS} elements: draw it with fewer"
            ));
        }
        if node.tag_name().name() == "use" {
            return Err("the picture uses <use>, which the svg check does not render: draw each shape itself".to_owned());
        }
        if node.ancestors().count() > MAX_DEPTH + 1 {
            return Err(format!(
                "the picture nests elements more than {MAX_DEPTH} deep: flatten its groups"
            ));
        }
    }
    Ok(())
}

/// Why `svg` is not a picture: it does not render, it paints (almost) nothing inside its
/// viewBox, or it is one flat colour. `None` for a picture. Text is not rendered (no fonts
/// are loaded, so a check does not depend on the machine's), so a picture of nothing but
/// text counts as blank.
pub fn blank(svg: &str) -> Option<String> {
    let pixmap = match render(svg, CHECK_WIDTH) {
        Ok(pixmap) => pixmap,
        Err(problem) => return Some(problem),
    };
    let pixels = pixmap.pixels();
    // Colours to 4 bits a channel, opaque enough to see.
    let mut colours = std::collections::HashMap::<[u8; 3], usize>::new();
    for pixel in pixels.iter().filter(|p| p.alpha() >= 128) {
        let c = pixel.demultiply();
        *colours
            .entry([c.red() >> 4, c.green() >> 4, c.blue() >> 4])
            .or_default() += 1;
    }
    let painted: usize = colours.values().sum();
    if painted * 1000 < pixels.len() * MIN_PAINTED_PER_MILLE {
        return Some(format!(
            "the picture is blank: it paints {:.1}% of its canvas; draw shapes with a fill inside the viewBox",
            painted as f64 * 100.0 / pixels.len() as f64
        ));
    }
    let mut counts: Vec<usize> = colours.into_values().collect();
    counts.sort_unstable_by_key(|&n| std::cmp::Reverse(n));
    let second = counts.get(1).copied().unwrap_or(0);
    if second * 1000 < painted * MIN_SECOND_COLOUR_PER_MILLE {
        return Some(
            "the picture is one flat colour: draw the subject on the background".to_owned(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svg(body: &str) -> String {
        format!(r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 400 300">{body}</svg>"#)
    }

    #[test]
    fn a_drawn_picture_passes() {
        let picture = svg(
            r##"<rect width="400" height="300" fill="#113"/><circle cx="200" cy="150" r="60" fill="#fc0"/>"##,
        );
        assert_eq!(blank(&picture), None);
        let pixmap = render(&picture, CHECK_WIDTH).unwrap();
        assert_eq!((pixmap.width(), pixmap.height()), (160, 120));
    }

    #[test]
    fn empty_off_canvas_unpainted_and_flat_pictures_are_blank() {
        let empty = blank(&svg("")).unwrap();
        assert!(
            empty.starts_with("the picture is blank: it paints 0.0%"),
            "{empty}"
        );
        // Shapes outside the viewBox, or without a fill, paint nothing.
        assert!(blank(&svg(r#"<circle cx="900" cy="900" r="50"/>"#)).is_some());
        assert!(blank(&svg(r#"<path d="l" fill="red"/>"#)).is_some());
        assert!(
            blank(&svg(
                r#"<rect width="400" height="300" fill="none" stroke="none"/>"#
            ))
            .is_some()
        );
        // A background whose edge is anti-aliased is still one colour.
        let flat = blank(&svg(
            r#"<rect x="0.3" width="399.4" height="300" fill="white"/>"#,
        ))
        .unwrap();
        assert!(flat.contains("one flat colour"), "{flat}");
    }

    #[test]
    fn tall_and_wide_pictures_are_seen_whole() {
        let tall = r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 100 2000"><rect width="100" height="2000" fill="navy"/><rect y="1800" width="100" height="200" fill="gold"/></svg>"#;
        assert_eq!(blank(tall), None);
        let pixmap = render(tall, CHECK_WIDTH).unwrap();
        assert_eq!(pixmap.height(), 4 * CHECK_WIDTH);
        let wide = r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 100000 1"/>"#;
        assert_eq!(render(wide, CHECK_WIDTH).unwrap().height(), 1);
    }

    #[test]
    fn documents_that_cannot_or_must_not_render_say_why() {
        let problem =
            blank(r#"<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"/>"#).unwrap();
        assert!(
            problem.starts_with("the picture does not render"),
            "{problem}"
        );
        let copies = svg(r##"<g id="a"><circle r="5"/></g><use href="#a"/>"##);
        assert!(blank(&copies).unwrap().contains("<use>"));
        let deep = svg(&format!("{}{}", "<g>".repeat(40), "</g>".repeat(40)));
        assert!(blank(&deep).unwrap().contains("32 deep"));
        let many = svg(&"<circle r=\"1\"/>".repeat(5001));
        assert!(blank(&many).unwrap().contains("more than 5000 elements"));
    }
}
