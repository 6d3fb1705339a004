import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * A small JSON reader for the golden vectors (the JDK has none, and the example needs nothing
 * beyond the JDK, gRPC and protobuf): objects become maps, arrays lists, numbers longs.
 */
final class Json {
  private final String s;
  private int pos;

  private Json(String s) {
    this.s = s;
  }

  static Object parse(String text) {
    Json j = new Json(text);
    Object v = j.value();
    j.space();
    if (j.pos != text.length()) {
      throw j.error("trailing characters");
    }
    return v;
  }

  private IllegalArgumentException error(String what) {
    return new IllegalArgumentException("JSON: " + what + " at character " + pos);
  }

  private void space() {
    while (pos < s.length() && Character.isWhitespace(s.charAt(pos))) {
      pos++;
    }
  }

  private void expect(char c) {
    space();
    if (pos >= s.length() || s.charAt(pos) != c) {
      throw error("expected '" + c + "'");
    }
    pos++;
  }

  private Object value() {
    space();
    if (pos >= s.length()) {
      throw error("unexpected end");
    }
    char c = s.charAt(pos);
    if (c == '{') {
      Map<String, Object> m = new LinkedHashMap<>();
      pos++;
      space();
      if (s.charAt(pos) == '}') {
        pos++;
        return m;
      }
      while (true) {
        space();
        String k = string();
        expect(':');
        m.put(k, value());
        space();
        if (s.charAt(pos) == ',') {
          pos++;
        } else {
          expect('}');
          return m;
        }
      }
    }
    if (c == '[') {
      List<Object> l = new ArrayList<>();
      pos++;
      space();
      if (s.charAt(pos) == ']') {
        pos++;
        return l;
      }
      while (true) {
        l.add(value());
        space();
        if (s.charAt(pos) == ',') {
          pos++;
        } else {
          expect(']');
          return l;
        }
      }
    }
    if (c == '"') {
      return string();
    }
    for (String word : new String[] {"null", "true", "false"}) {
      if (s.startsWith(word, pos)) {
        pos += word.length();
        return word.equals("null") ? null : Boolean.valueOf(word.equals("true"));
      }
    }
    int start = pos;
    while (pos < s.length() && "+-0123456789".indexOf(s.charAt(pos)) >= 0) {
      pos++;
    }
    if (start == pos || (pos < s.length() && ".eE".indexOf(s.charAt(pos)) >= 0)) {
      throw error("expected an integer");
    }
    return Long.parseLong(s.substring(start, pos));
  }

  private String string() {
    if (s.charAt(pos) != '"') {
      throw error("expected a string");
    }
    pos++;
    StringBuilder b = new StringBuilder();
    while (true) {
      char c = s.charAt(pos++);
      if (c == '"') {
        return b.toString();
      }
      if (c != '\\') {
        b.append(c);
        continue;
      }
      char e = s.charAt(pos++);
      switch (e) {
        case 'n': b.append('\n'); break;
        case 't': b.append('\t'); break;
        case 'r': b.append('\r'); break;
        case 'b': b.append('\b'); break;
        case 'f': b.append('\f'); break;
        case 'u':
          b.append((char) Integer.parseInt(s.substring(pos, pos + 4), 16));
          pos += 4;
          break;
        default: b.append(e);
      }
    }
  }
}
